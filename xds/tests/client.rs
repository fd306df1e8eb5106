//! The delta ADS client against a scripted control plane over real TLS and
//! gRPC: what it does when a stream breaks in the middle of a push in parts.

#![expect(clippy::unwrap_used, reason = "a test: setup failures abort it")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::{Request, Response, Status};
use weft_xds::client::{AdsClient, Rejected, Update};
use weft_xds::grpc::{BoxedDeltaStream, ControlPlane, ControlPlaneAddress, connect};
use weft_xds::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use weft_xds::proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource, SharedAny,
};
use weft_xds::proto::security::Authorization;
use weft_xds::{AUTHORIZATION_TYPE, PARTIAL};

const SERVER_NAME: &str = "control-plane.test";

/// Stream 1 sends one part of a push (resource `ghost`), waits for its ACK
/// and hangs up. Stream 2 sends a whole state without it (`kept`).
#[derive(Default)]
struct Script {
    streams: AtomicUsize,
    /// What the client said it held when stream 2 opened.
    held_on_reconnect: Mutex<Option<BTreeMap<String, String>>>,
}

fn response(nonce: &str, name: &str, partial: bool) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: if partial { PARTIAL.into() } else { "2".into() },
        resources: vec![Resource {
            version: "v1".into(),
            resource: Some(SharedAny {
                type_url: AUTHORIZATION_TYPE.into(),
                value: prost::Message::encode_to_vec(&Authorization::default()).into(),
            }),
            name: name.into(),
            aliases: Vec::new(),
        }],
        type_url: AUTHORIZATION_TYPE.into(),
        nonce: nonce.into(),
        removed_resources: Vec::new(),
    }
}

impl ControlPlane for Script {
    type DeltaStream = BoxedDeltaStream;

    async fn delta_aggregated_resources(
        self: Arc<Self>,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<BoxedDeltaStream>, Status> {
        let n = self.streams.fetch_add(1, Ordering::AcqRel);
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let this = self.clone();
        tokio::spawn(async move {
            let Ok(Some(first)) = requests.message().await else {
                return;
            };
            if n == 0 {
                let _ = tx.send(Ok(response("1", "ghost", true))).await;
                // The part is ACKed; then the stream breaks mid-push.
                while let Ok(Some(req)) = requests.message().await {
                    if req.response_nonce == "1" {
                        return;
                    }
                }
                return;
            }
            *this.held_on_reconnect.lock().unwrap() = Some(first.initial_resource_versions);
            let _ = tx.send(Ok(response("2", "kept", false))).await;
            // Kept open until the client goes.
            while let Ok(Some(_)) = requests.message().await {}
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_certificate(
        self: Arc<Self>,
        _: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        Err(Status::unimplemented("not in this script"))
    }
}

/// The part of a push that a broken stream delivered is never applied, and
/// never announced as held: the next stream's state is applied alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_of_a_broken_stream_are_dropped() {
    let ca = weft_hbone::ca::Ca::generate("cluster.local").unwrap();
    let (cert, key) = ca
        .issue_server(&[SERVER_NAME.to_string()], Duration::from_secs(600))
        .unwrap();
    let chain = format!("{}{}", cert.cert_pem, ca.cert_pem());
    let tls = weft_hbone::tls::control_plane_server_config(&chain, &key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(Script::default());
    let (conns_tx, conns_rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(tls) = acceptor.accept(tcp).await {
                let _ = conns_tx.send(Ok::<_, std::io::Error>(tls)).await;
            }
        }
    });
    let server = weft_xds::grpc::Server::new(script.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(server, ReceiverStream::new(conns_rx)),
    );

    let dir = std::env::temp_dir().join(format!("weft-xds-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "a-token").unwrap();
    let cp = ControlPlaneAddress::fixed(
        addr.to_string(),
        SERVER_NAME,
        weft_hbone::tls::control_plane_client_config(ca.cert_pem()).unwrap(),
    );
    let applied = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = applied.clone();
    let handler = move |updates: Vec<Update<Authorization>>| -> Vec<Rejected> {
        for u in updates {
            if let Update::Upsert { name, .. } = u {
                seen.lock().unwrap().push(name);
            }
        }
        Vec::new()
    };
    let client = AdsClient::new(
        connect(&cp).unwrap(),
        dir.join("token"),
        weft_xds::client::node("test~1".into(), "node-1"),
    )
    .handle::<Authorization, _>(AUTHORIZATION_TYPE, handler);
    let synced: Arc<AtomicBool> = client.synced();
    let running = tokio::spawn(client.run());
    for _ in 0..500 {
        if synced.load(Ordering::Acquire) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    running.abort();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        synced.load(Ordering::Acquire),
        "synced on the second stream"
    );
    assert_eq!(script.streams.load(Ordering::Acquire), 2);
    assert_eq!(
        *applied.lock().unwrap(),
        ["kept"],
        "the broken stream's part is never applied"
    );
    assert_eq!(
        script.held_on_reconnect.lock().unwrap().clone(),
        Some(BTreeMap::new()),
        "nor announced as held"
    );
}
