//! A control plane between a ztunnel and the lab's controller that relays
//! both calls (delta ADS and the CA) and holds back the end of the first
//! Address push: what a slow control plane looks like to a starting ztunnel
//! in the middle of a push in parts.
//!
//! It runs in the lab's underlay, beside the controller, with a serving
//! certificate of the lab's mesh root for the controller's name, so a
//! ztunnel pointed at it (`XDS_ADDRESS`) trusts it as it trusts the
//! controller.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::{Request, Response, Status};
use weft_xds::grpc::{ControlPlane, ControlPlaneAddress, bearer_token, connect, delta_ads};
use weft_xds::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use weft_xds::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use weft_xds::{ADDRESS_TYPE, PARTIAL};

use crate::Lab;
use crate::lab::{CONTROLLER_IP, CONTROLLER_NAME, CONTROLLER_PORT};

/// What the relay has seen, shared with the test.
#[derive(Debug, Default)]
struct Seen {
    /// Address responses marked partial, passed on to the client.
    partial_passed: AtomicUsize,
    /// ACKs the client sent for those.
    partial_acked: AtomicUsize,
    /// An Address response that ends a push is waiting for [`Relay::release`].
    holding: AtomicBool,
    /// Nonces of the partial responses passed on.
    partial_nonces: std::sync::Mutex<Vec<String>>,
}

struct Inner {
    upstream: ControlPlaneAddress,
    released: watch::Receiver<bool>,
    seen: Arc<Seen>,
}

/// The relay; stopped on drop.
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    release: watch::Sender<bool>,
    seen: Arc<Seen>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Relay {
    /// Starts it on `port` of the controller's underlay address.
    pub fn start(lab: &Lab, port: u16) -> Result<Relay> {
        let ca = lab.ca()?;
        let (cert, key) =
            ca.issue_server(&[CONTROLLER_NAME.to_string()], Duration::from_secs(3600))?;
        let chain = format!("{}{}", cert.cert_pem, ca.cert_pem());
        let tls = weft_hbone::tls::control_plane_server_config(&chain, &key)?;
        let root = ca.cert_pem().to_string();
        let upstream = ControlPlaneAddress::fixed(
            format!("{CONTROLLER_IP}:{CONTROLLER_PORT}"),
            CONTROLLER_NAME,
            weft_hbone::tls::control_plane_client_config(&root)?,
        );
        let (release, released) = watch::channel(false);
        let seen = Arc::new(Seen::default());
        let inner = Arc::new(Inner {
            upstream,
            released,
            seen: seen.clone(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (up_tx, up_rx) = std::sync::mpsc::channel();
        let addr = SocketAddr::from((CONTROLLER_IP, port));
        let underlay = lab.underlay_netns()?;
        // Every socket of the relay, both ways, is made on this one thread,
        // inside the underlay.
        let thread = underlay.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("relay: bind {addr}"))?;
                let _ = up_tx.send(());
                let acceptor = TlsAcceptor::from(tls);
                let (conns_tx, conns_rx) = mpsc::channel(8);
                tokio::spawn(async move {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let (acceptor, conns_tx) = (acceptor.clone(), conns_tx.clone());
                        tokio::spawn(async move {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = conns_tx.send(Ok::<_, std::io::Error>(tls)).await;
                            }
                        });
                    }
                });
                let serve = tonic::transport::Server::builder().serve_with_incoming(
                    weft_xds::grpc::Server::new(inner),
                    ReceiverStream::new(conns_rx),
                );
                // Stopping drops every stream at once (with the runtime):
                // a graceful end would wait for ztunnel to hang up.
                tokio::select! {
                    served = serve => served.context("relay: serving"),
                    _ = stopped => Ok(()),
                }
            })
        })?;
        up_rx
            .recv_timeout(Duration::from_secs(10))
            .context("relay did not start listening")?;
        Ok(Relay {
            addr,
            release,
            seen,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Lets the held end of the push (and everything after it) through.
    pub fn release(&self) {
        let _ = self.release.send(true);
    }

    /// Whether the end of an Address push is being held back.
    pub fn holding(&self) -> bool {
        self.seen.holding.load(Ordering::Acquire)
    }

    /// How many partial Address responses went to the client, and how many
    /// of them it ACKed.
    pub fn partial(&self) -> (usize, usize) {
        (
            self.seen.partial_passed.load(Ordering::Acquire),
            self.seen.partial_acked.load(Ordering::Acquire),
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.release();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type DeltaStream = weft_xds::grpc::BoxedDeltaStream;

impl ControlPlane for Inner {
    type DeltaStream = DeltaStream;

    async fn delta_aggregated_resources(
        self: Arc<Self>,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let token = bearer_token(&request).unwrap_or_default().to_string();
        let mut from_client = request.into_inner();
        let (up_tx, up_rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        let seen = self.seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(req)) = from_client.message().await {
                let acks_partial = req.type_url == ADDRESS_TYPE
                    && req.error_detail.is_none()
                    && seen
                        .partial_nonces
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .contains(&req.response_nonce);
                if acks_partial {
                    seen.partial_acked.fetch_add(1, Ordering::AcqRel);
                }
                if up_tx.send(req).await.is_err() {
                    return;
                }
            }
        });
        let channel =
            connect(&self.upstream).map_err(|e| Status::unavailable(format!("relay: {e}")))?;
        let mut from_controller = delta_ads(channel, &token, ReceiverStream::new(up_rx)).await?;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let mut released = this.released.clone();
            // Address responses from the held end on, in order; other types
            // pass (ADS orders responses within a type only), so the only
            // thing missing is the end of the Address state.
            let mut held: Option<Vec<DeltaDiscoveryResponse>> = None;
            loop {
                let resp = tokio::select! {
                    msg = from_controller.message() => match msg {
                        Ok(Some(resp)) => resp,
                        _ => return,
                    },
                    () = async { let _ = released.wait_for(|r| *r).await; }, if held.is_some() => {
                        this.seen.holding.store(false, Ordering::Release);
                        for resp in held.take().into_iter().flatten() {
                            if tx.send(Ok(resp)).await.is_err() {
                                return;
                            }
                        }
                        // Held once: from now on, everything passes.
                        continue;
                    }
                };
                let released_now = *released.borrow();
                if resp.type_url == ADDRESS_TYPE {
                    if let Some(queue) = held.as_mut() {
                        queue.push(resp);
                        continue;
                    }
                    if resp.system_version_info == PARTIAL {
                        this.seen
                            .partial_nonces
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(resp.nonce.clone());
                        this.seen.partial_passed.fetch_add(1, Ordering::AcqRel);
                    } else if !released_now {
                        this.seen.holding.store(true, Ordering::Release);
                        held = Some(vec![resp]);
                        continue;
                    }
                }
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_certificate(
        self: Arc<Self>,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let token = bearer_token(&request).unwrap_or_default().to_string();
        let channel =
            connect(&self.upstream).map_err(|e| Status::unavailable(format!("relay: {e}")))?;
        let resp =
            weft_xds::grpc::create_certificate(channel, &token, request.into_inner()).await?;
        Ok(Response::new(resp))
    }
}
