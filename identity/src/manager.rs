//! [`CertManager`]: one certificate per identity, never shared between
//! identities, renewed at half-life, and the TLS configs built from them.
//!
//! No lock is held across a CA call: each identity has its own single flight
//! (concurrent first connections of one identity ask once; other identities
//! are not held up), every request has a deadline, at most
//! [`MAX_CONCURRENT_REQUESTS`] are in flight, and one refresher task
//! ([`CertManager::refresh`]) fetches what is wanted and renews what is due.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, ServerConfig};
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{info, warn};
use weft_api::Identity;
use weft_hbone::ca::{CaError, CertRequest, IssuedCert};
use weft_hbone::tls::{self, TlsError, TrustRoots};

use crate::signer::{SignError, Signer};

/// How long one CA request may take before it is abandoned (and retried by
/// the refresher): a hung CA must not hold a connection forever.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// CA requests in flight at once, all identities together.
pub const MAX_CONCURRENT_REQUESTS: usize = 8;
/// How often the refresher looks for due renewals without being woken.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// After a failed request for an identity, the refresher waits this long
/// before asking again (connections still ask at once), so a failing CA is
/// not hammered twice a second per identity.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Issues and caches certificates and TLS configs per identity.
#[derive(Debug)]
pub struct CertManager {
    signer: Box<dyn Signer>,
    /// The roots configured at start (the root file, or the local CA):
    /// trusted until the CA has sent its own.
    initial_roots_pem: String,
    /// The roots in force, PEM and parsed: the CA's latest bundle once it has
    /// sent one (so a root dropped by a rotation stops being trusted), else
    /// the configured ones.
    roots: Mutex<(String, TrustRoots)>,
    ttl: Duration,
    certs: Mutex<HashMap<Identity, Arc<Issued>>>,
    /// One request in flight per identity: callers for the same identity
    /// wait on its lock; other identities do not.
    flights: Mutex<HashMap<Identity, Arc<tokio::sync::Mutex<()>>>>,
    /// The last failed request per identity: callers that waited on that
    /// flight get its error instead of asking again.
    failures: Mutex<HashMap<Identity, (tokio::time::Instant, String)>>,
    requests: Semaphore,
}

/// A certificate with the TLS configs made from it.
#[derive(Debug)]
struct Issued {
    cert: IssuedCert,
    /// Renew from here on: half of the lifetime counted from issuance (the
    /// certificate's notBefore is backdated for clock skew, so not from there).
    renew_at: SystemTime,
    roots: TrustRoots,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<Identity, Arc<ClientConfig>>>,
}

/// What the admin config dump shows of a certificate.
#[derive(Debug, Serialize)]
pub struct CertInfo {
    pub identity: String,
    pub not_before: u64,
    pub not_after: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("certificate for {identity}: {source}")]
    Sign {
        identity: String,
        #[source]
        source: SignError,
    },
    #[error(
        "the mesh CA did not answer for {identity} within {timeout:?}; is the controller reachable?"
    )]
    Timeout { identity: String, timeout: Duration },
    #[error("mesh CA answered for {identity} with an unusable chain: {why}")]
    BadChain { identity: String, why: String },
    #[error("no certificate for {identity}: the request this one waited on failed: {why}")]
    FlightFailed { identity: String, why: String },
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl CertManager ===

impl CertManager {
    /// `roots_pem`: the mesh roots to trust until the CA sends its own (the
    /// local CA's certificate, or the root file a node agent is given).
    pub fn new(
        signer: Box<dyn Signer>,
        roots_pem: &str,
        ttl: Duration,
    ) -> Result<Self, IdentityError> {
        let roots = TrustRoots::from_pem(roots_pem)?;
        Ok(CertManager {
            signer,
            initial_roots_pem: roots_pem.to_string(),
            roots: Mutex::new((roots_pem.to_string(), roots)),
            ttl,
            certs: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            requests: Semaphore::new(MAX_CONCURRENT_REQUESTS),
        })
    }

    /// Every mesh root trusted now, PEM, and the configured ones (the control
    /// plane may still be vouched for by those).
    pub fn trusted_pem(&self) -> String {
        let current = lock(&self.roots).0.clone();
        if current == self.initial_roots_pem {
            current
        } else {
            format!("{current}\n{}", self.initial_roots_pem)
        }
    }

    /// The mesh trust roots in force.
    pub fn roots(&self) -> TrustRoots {
        lock(&self.roots).1.clone()
    }

    fn cached(&self, id: &Identity) -> Option<Arc<Issued>> {
        let valid = |i: &&Arc<Issued>| SystemTime::now() < i.cert.not_after;
        lock(&self.certs).get(id).filter(valid).cloned()
    }

    /// The cached certificate for `id`, while it is valid; else a new one.
    async fn issued(&self, id: &Identity) -> Result<Arc<Issued>, IdentityError> {
        if let Some(i) = self.cached(id) {
            return Ok(i);
        }
        let waited_from = tokio::time::Instant::now();
        let flight = self.flight(id);
        let _one = flight.lock().await;
        if let Some(i) = self.cached(id) {
            return Ok(i);
        }
        if let Some((at, why)) = lock(&self.failures).get(id)
            && *at >= waited_from
        {
            return Err(IdentityError::FlightFailed {
                identity: id.to_string(),
                why: why.clone(),
            });
        }
        let issued = self.issue(id).await;
        match &issued {
            Ok(_) => lock(&self.failures).remove(id),
            Err(e) => lock(&self.failures)
                .insert(id.clone(), (tokio::time::Instant::now(), e.to_string())),
        };
        issued
    }

    fn flight(&self, id: &Identity) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.flights).entry(id.clone()).or_default().clone()
    }

    /// Asks the signer for a new certificate for `id`, within the deadline
    /// and the concurrency bound, and caches it. Callers hold `id`'s flight.
    async fn issue(&self, id: &Identity) -> Result<Arc<Issued>, IdentityError> {
        let identity = id.to_string();
        let signed = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let _slot = self.requests.acquire().await;
            let req = CertRequest::new(id)?;
            let signed = self
                .signer
                .sign(id, &req, self.ttl)
                .await
                .map_err(|source| IdentityError::Sign {
                    identity: identity.clone(),
                    source,
                })?;
            Ok::<_, IdentityError>((req, signed))
        })
        .await
        .map_err(|_| IdentityError::Timeout {
            identity: identity.clone(),
            timeout: REQUEST_TIMEOUT,
        })??;
        let (req, signed) = signed;
        let bad = |why: String| IdentityError::BadChain {
            identity: identity.clone(),
            why,
        };
        let (not_before, not_after, got) =
            tls::leaf_info(&signed.chain_pem).map_err(|e| bad(e.to_string()))?;
        if &got != id {
            return Err(bad(format!("the leaf is for {got}")));
        }
        if let Some(pem) = &signed.roots_pem {
            self.set_roots(pem).map_err(|e| bad(e.to_string()))?;
        }
        let cert = IssuedCert {
            identity: id.clone(),
            chain_pem: signed.chain_pem,
            key_pem: req.key_pem,
            not_before,
            not_after,
        };
        let now = SystemTime::now();
        let renew_at = now + cert.not_after.duration_since(now).unwrap_or_default() / 2;
        let roots = self.roots();
        let server = tls::server_config(&cert, &roots)?;
        info!(
            component = "identity",
            identity = %id,
            expires = unix(cert.not_after),
            "workload certificate issued"
        );
        let issued = Arc::new(Issued {
            cert,
            renew_at,
            roots,
            server,
            clients: Mutex::new(HashMap::new()),
        });
        lock(&self.certs).insert(id.clone(), issued.clone());
        Ok(issued)
    }

    /// Trusts exactly the CA's bundle from now on (old and new roots side by
    /// side during a rotation; only the new one after it). New TLS configs
    /// use it; open connections keep theirs.
    fn set_roots(&self, pem: &str) -> Result<(), IdentityError> {
        let mut roots = lock(&self.roots);
        if roots.0 == pem {
            return Ok(());
        }
        let parsed = TrustRoots::from_pem(pem)?;
        *roots = (pem.to_string(), parsed.clone());
        drop(roots);
        // Certificates issued before keep their keys but verify peers by
        // the new roots from now on, without waiting for their renewal.
        let mut certs = lock(&self.certs);
        for issued in certs.values_mut() {
            let server = tls::server_config(&issued.cert, &parsed)?;
            *issued = Arc::new(Issued {
                cert: issued.cert.clone(),
                renew_at: issued.renew_at,
                roots: parsed.clone(),
                server,
                clients: Mutex::new(HashMap::new()),
            });
        }
        info!(
            component = "identity",
            "mesh trust roots updated: the CA's bundle replaces the previous roots"
        );
        Ok(())
    }

    /// Server config presenting `id`'s certificate (inbound HBONE).
    pub async fn server_config(&self, id: &Identity) -> Result<Arc<ServerConfig>, IdentityError> {
        Ok(self.issued(id).await?.server.clone())
    }

    /// Client config presenting `src`'s certificate and accepting only `dst`.
    pub async fn client_config(
        &self,
        src: &Identity,
        dst: &Identity,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let issued = self.issued(src).await?;
        let mut clients = lock(&issued.clients);
        if let Some(cfg) = clients.get(dst) {
            return Ok(cfg.clone());
        }
        let cfg = tls::client_config(&issued.cert, &issued.roots, vec![dst.clone()])?;
        clients.insert(dst.clone(), cfg.clone());
        Ok(cfg)
    }

    /// Gets or renews `id`'s certificate as the refresher does: a renewal
    /// that fails keeps the current certificate (still valid), retried later.
    async fn refresh_one(&self, id: Identity) {
        let flight = self.flight(&id);
        let _one = flight.lock().await;
        let due = self
            .cached(&id)
            .is_none_or(|i| SystemTime::now() >= i.renew_at);
        if !due {
            return;
        }
        match self.issue(&id).await {
            Ok(_) => {
                lock(&self.failures).remove(&id);
            }
            Err(e) => {
                warn!(component = "identity", identity = %id, error = %e, "cannot get a certificate; keeping any current one, will retry");
                lock(&self.failures).insert(id, (tokio::time::Instant::now(), e.to_string()));
            }
        }
    }

    /// Whether a request for `id` failed less than [`RETRY_AFTER`] ago.
    fn backing_off(&self, id: &Identity) -> bool {
        lock(&self.failures)
            .get(id)
            .is_some_and(|(at, _)| at.elapsed() < RETRY_AFTER)
    }

    /// The one refresher: keeps a certificate for every identity in `wanted`
    /// (fetched ahead of the first connection), renews each at half-life,
    /// and forgets identities no longer wanted. Runs until `wanted` closes.
    /// Each identity is worked on by at most one task at a time; a CA that
    /// hangs for one identity holds up no other.
    pub async fn refresh(self: Arc<Self>, mut wanted: watch::Receiver<BTreeSet<Identity>>) {
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut busy: HashMap<tokio::task::Id, Identity> = HashMap::new();
        let mut tick = tokio::time::interval(REFRESH_INTERVAL);
        loop {
            tokio::select! {
                changed = wanted.changed() => if changed.is_err() { break },
                _ = tick.tick() => {}
                Some(done) = tasks.join_next_with_id() => {
                    // Finished or failed alike: the identity is free again.
                    let task = match done {
                        Ok((task, ())) => task,
                        Err(e) => e.id(),
                    };
                    busy.remove(&task);
                    continue;
                }
            }
            let ids = wanted.borrow_and_update().clone();
            self.retain(&ids);
            let now = SystemTime::now();
            for id in ids {
                let due = self.cached(&id).is_none_or(|i| now >= i.renew_at);
                if !due || self.backing_off(&id) || busy.values().any(|b| *b == id) {
                    continue;
                }
                let (this, which) = (self.clone(), id.clone());
                let task = tasks.spawn(async move { this.refresh_one(which).await });
                busy.insert(task.id(), id);
            }
        }
        tasks.abort_all();
    }

    /// Drops certificates (and flights) of identities no longer wanted.
    pub fn retain(&self, keep: &BTreeSet<Identity>) {
        lock(&self.certs).retain(|id, _| keep.contains(id));
        lock(&self.flights).retain(|id, f| keep.contains(id) || Arc::strong_count(f) > 1);
        lock(&self.failures).retain(|id, _| keep.contains(id));
    }

    /// Certificates held, for the config dump.
    pub fn dump(&self) -> Vec<CertInfo> {
        let certs = lock(&self.certs);
        let mut out: Vec<CertInfo> = certs
            .values()
            .map(|i| CertInfo {
                identity: i.cert.identity.to_string(),
                not_before: unix(i.cert.not_before),
                not_after: unix(i.cert.not_after),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

#[cfg(test)]
mod tests {
    use weft_hbone::ca::Ca;

    use super::*;
    use crate::signer::{LocalSigner, SignFuture, Signed};

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "ns", sa).unwrap()
    }

    fn local(ttl: Duration) -> (CertManager, String) {
        let ca = Ca::generate("cluster.local").unwrap();
        let root = ca.cert_pem().to_string();
        let m = CertManager::new(Box::new(LocalSigner(ca)), &root, ttl).unwrap();
        (m, root)
    }

    /// Certificates are per identity, cached until half-life, then renewed.
    #[tokio::test]
    async fn per_identity_and_renewal() {
        // 4 s: the certificate holds whole seconds, so the renewal is due
        // 1.5 to 2 s after issue, leaving room for a slow machine before the
        // "not due yet" check.
        let (certs, _) = local(Duration::from_secs(4));
        let (a, b) = (id("a"), id("b"));
        let first = certs.server_config(&a).await.unwrap();
        assert!(Arc::ptr_eq(&first, &certs.server_config(&a).await.unwrap()));
        assert!(!Arc::ptr_eq(
            &first,
            &certs.server_config(&b).await.unwrap()
        ));
        assert_eq!(certs.dump().len(), 2);
        certs.refresh_one(a.clone()).await;
        assert!(
            Arc::ptr_eq(&first, &certs.server_config(&a).await.unwrap()),
            "not due yet"
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        certs.refresh_one(a.clone()).await;
        let again = certs.server_config(&a).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
    }

    /// A CA that hangs for `stuck` and answers at once for everyone else.
    #[derive(Debug)]
    struct Hanging {
        ca: LocalSigner,
        stuck: Identity,
    }

    impl Signer for Hanging {
        fn sign<'a>(
            &'a self,
            id: &'a Identity,
            req: &'a CertRequest,
            ttl: Duration,
        ) -> SignFuture<'a> {
            if *id == self.stuck {
                return Box::pin(std::future::pending::<Result<Signed, SignError>>());
            }
            self.ca.sign(id, req, ttl)
        }
    }

    /// A CA that hangs for one identity delays no other identity's first
    /// connection; concurrent callers of the hung identity share one
    /// request, which ends at the deadline with an error that says so.
    #[tokio::test(start_paused = true)]
    async fn a_hung_identity_holds_up_no_other() {
        let ca = Ca::generate("cluster.local").unwrap();
        let root = ca.cert_pem().to_string();
        let signer = Hanging {
            ca: LocalSigner(ca),
            stuck: id("stuck"),
        };
        let certs =
            Arc::new(CertManager::new(Box::new(signer), &root, Duration::from_secs(600)).unwrap());
        let stuck = |c: Arc<CertManager>| async move { c.server_config(&id("stuck")).await };
        let first = tokio::spawn(stuck(certs.clone()));
        let second = tokio::spawn(stuck(certs.clone()));
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        certs.server_config(&id("fine")).await.unwrap();
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no wait behind the hung identity"
        );
        let errors = [
            first.await.unwrap().unwrap_err(),
            second.await.unwrap().unwrap_err(),
        ];
        assert_eq!(
            started.elapsed(),
            REQUEST_TIMEOUT,
            "one request, one deadline"
        );
        assert!(
            matches!(errors[0], IdentityError::Timeout { .. }),
            "{}",
            errors[0]
        );
        assert!(
            matches!(errors[1], IdentityError::FlightFailed { .. }),
            "{}",
            errors[1]
        );
        assert!(
            errors[1].to_string().contains("did not answer"),
            "{}",
            errors[1]
        );
    }

    /// The roots follow the CA's bundle: they grow for a rotation and shrink
    /// after it, so a retired root stops being trusted without a restart.
    #[tokio::test]
    async fn roots_follow_the_ca() {
        let (certs, initial) = local(Duration::from_secs(600));
        assert_eq!(certs.trusted_pem(), initial);
        let other = Ca::generate("cluster.local")
            .unwrap()
            .cert_pem()
            .to_string();
        let both = format!("{initial}{other}");
        certs.set_roots(&both).unwrap();
        assert_eq!(lock(&certs.roots).0, both);
        let before = certs.server_config(&id("a")).await.unwrap();
        certs.set_roots(&other).unwrap();
        assert_eq!(lock(&certs.roots).0, other, "the old root is gone");
        let after = certs.server_config(&id("a")).await.unwrap();
        assert!(
            !Arc::ptr_eq(&before, &after),
            "a cached certificate's TLS config follows the new roots"
        );
    }

    /// The refresher fetches what is wanted, and forgets what is not.
    #[tokio::test]
    async fn refresher_follows_wanted() {
        let (certs, _) = local(Duration::from_secs(600));
        let certs = Arc::new(certs);
        let (tx, rx) = watch::channel(BTreeSet::from([id("a"), id("b")]));
        let task = tokio::spawn(certs.clone().refresh(rx));
        for _ in 0..200 {
            if certs.dump().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(certs.dump().len(), 2);
        tx.send(BTreeSet::from([id("b")])).unwrap();
        for _ in 0..200 {
            if certs.dump().len() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let held: Vec<String> = certs.dump().into_iter().map(|c| c.identity).collect();
        assert_eq!(held, [id("b").to_string()]);
        drop(tx);
        task.await.unwrap();
    }
}
