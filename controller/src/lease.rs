//! Kubernetes mode: which controller replica writes to the cluster.
//!
//! Every replica serves xDS and signs certificates. Only one writes:
//! statuses, waypoint objects, the mesh root's ConfigMaps. The others
//! would repeat its writes and fight over them. The writer holds the Lease
//! `weft-controller` in the controller's namespace (coordination.k8s.io),
//! as Kubernetes' own controllers elect theirs: it renews the lease every
//! [`Timing::renew`], and another replica takes it over once it has gone
//! [`Timing::duration`] without renewal. A stopping leader gives the lease
//! up, so its successor need not wait. The CA's Secret is created before
//! any election, and a creation race is settled by the API server (the
//! loser reads the winner's root).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

/// The lease's name.
pub const LEASE: &str = "weft-controller";

/// How long a lease lasts without renewal (whole seconds, as the Lease
/// holds it), and how often it is renewed.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub duration: Duration,
    pub renew: Duration,
}

impl Default for Timing {
    /// Kubernetes' own controllers' values.
    fn default() -> Self {
        Timing {
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(2),
        }
    }
}

/// Whether this replica leads, as it changes; `identity` names it in the
/// lease (its pod's name).
pub fn elect(
    client: Client,
    namespace: &str,
    identity: &str,
    timing: Timing,
    stop: watch::Receiver<bool>,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let identity = identity.to_string();
    tokio::spawn(run(api, identity, timing, tx, stop));
    rx
}

async fn run(
    api: Api<Lease>,
    me: String,
    timing: Timing,
    leader: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    // When we last held the lease for sure: past `duration`, we no longer do.
    // Taken before the round, so before the renewTime it writes: this
    // replica's lead ends no later than the lease others read.
    let mut held_at: Option<tokio::time::Instant> = None;
    let publish = |leads: bool| {
        leader.send_if_modified(|cur| {
            if *cur == leads {
                return false;
            }
            if leads {
                info!(component = "kubernetes", identity = %me, "leading: this replica writes to the cluster");
            } else {
                info!(component = "kubernetes", identity = %me, "not leading: another replica writes to the cluster");
            }
            *cur = leads;
            true
        });
    };
    loop {
        let started = tokio::time::Instant::now();
        // A lease that ran out while this replica slept or failed to renew
        // ends its lead before anything else is tried.
        held_at = held_at.filter(|t| started < *t + timing.duration);
        publish(held_at.is_some());
        // A round that hangs (an API server that stopped answering) must
        // not keep a lead past the lease: it ends when the lease would.
        let limit = held_at.map_or(timing.duration, |t| t + timing.duration - started);
        match tokio::time::timeout(limit, try_lead(&api, &me, timing)).await {
            Ok(Ok(true)) => held_at = Some(started),
            Ok(Ok(false)) => held_at = None,
            Ok(Err(e)) => {
                warn!(component = "kubernetes", error = %e, "leader election: cannot reach the lease")
            }
            Err(_) => {
                warn!(component = "kubernetes", after = ?limit, "leader election: the lease round timed out")
            }
        }
        held_at = held_at.filter(|t| t.elapsed() < timing.duration);
        publish(held_at.is_some());
        // The next round comes after `renew`, or when the lease would run
        // out if that is sooner.
        let next = held_at.map_or(timing.renew, |t| {
            timing
                .renew
                .min((t + timing.duration).saturating_duration_since(tokio::time::Instant::now()))
        });
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = stop.changed() => {
                if *leader.borrow() {
                    release(&api, &me).await;
                }
                leader.send_replace(false);
                return;
            }
        }
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// One round: create, renew or take over the lease. Ok(true) when ours.
async fn try_lead(api: &Api<Lease>, me: &str, timing: Timing) -> Result<bool, kube::Error> {
    let duration = i32::try_from(timing.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(LEASE).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_string()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        let held = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(duration)).unwrap_or(0),
        );
        let since = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
        since.as_secs() >= 0 && since.unsigned_abs() >= held
    });
    if holder != me && !holder.is_empty() && !expired {
        return Ok(false);
    }
    if holder != me {
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(duration);
    spec.renew_time = Some(now());
    // The resourceVersion read makes this a compare-and-swap: a replica
    // that wrote in between wins, and we learn it on the next round.
    match api.replace(LEASE, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up, so another replica takes over at once.
async fn release(api: &Api<Lease>, me: &str) {
    let Ok(Some(mut lease)) = api.get_opt(LEASE).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match api.replace(LEASE, &PostParams::default(), &lease).await {
        Ok(_) => info!(component = "kubernetes", identity = %me, "gave up the lease"),
        Err(e) => warn!(component = "kubernetes", error = %e, "cannot give up the lease"),
    }
}
