//! The controller over its real gRPC/TLS endpoint, in process: the CA's
//! refusals and signatures, and delta ADS (initial state, deltas of only what
//! changed, ACK/NACK, reconnect with versions).

#![expect(clippy::unwrap_used, reason = "test helpers panic on setup failures")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use weft_api::Identity;
use weft_controller::app::{self, Config, SourceConfig};
use weft_controller::translate::Mesh;
use weft_hbone::ca::CertRequest;
use weft_xds::grpc::{ControlPlaneAddress, connect, create_certificate, delta_ads};
use weft_xds::proto::ca::IstioCertificateRequest;
use weft_xds::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Status};
use weft_xds::proto::workload::{Address, address};
use weft_xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

const TOKEN_1: &str = "node-1-token-0123456789";
const TOKEN_2: &str = "node-2-token-0123456789";
/// A waypoint's token: it acts as `spiffe://cluster.local/ns/shop/sa/waypoint`.
const TOKEN_WAYPOINT: &str = "waypoint-token-0123456789";
/// Another workload's token (not a waypoint of anything).
const TOKEN_CLIENT: &str = "client-token-0123456789";

fn pod(name: &str, node: &str, sa: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: app}}]}}\n\
         status: {{podIP: {ip}}}\n"
    )
}

fn manifests(web_label: &str) -> String {
    [
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n".to_string(),
        pod("client", "node-1", "client", "10.244.1.10"),
        pod("web", "node-2", "web", "10.244.2.10").replace("namespace: shop}", &format!("namespace: shop, labels: {{version: {web_label}}}}}")),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80}]}\n".to_string(),
    ]
    .join("---\n")
}

struct Running {
    dir: PathBuf,
    channel: Channel,
    metrics: u16,
}

impl Running {
    /// `GET path` on the metrics port: (status line, body).
    async fn get(&self, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics))
            .await
            .unwrap();
        c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).await.unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }

    /// The value of one sample line of `/metrics`, `name{labels}`.
    async fn metric(&self, sample: &str) -> f64 {
        let (_, body) = self.get("/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start(name: &str) -> Running {
    start_with(name, &manifests("v1")).await
}

/// A controller serving `mesh` (manifests) from the start.
async fn start_with(name: &str, mesh: &str) -> Running {
    let dir = std::env::temp_dir().join(format!("weft-ctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    write(&dir.join("manifests/mesh.yaml"), mesh);
    std::fs::write(
        dir.join("tokens"),
        format!(
            "node-1 {TOKEN_1}\nnode-2 {TOKEN_2}\n\
             spiffe://cluster.local/ns/shop/sa/waypoint {TOKEN_WAYPOINT}\n\
             spiffe://cluster.local/ns/shop/sa/client {TOKEN_CLIENT}\n"
        ),
    )
    .unwrap();
    let cfg = Config {
        source: SourceConfig::Manifests {
            dir: dir.join("manifests"),
            ca_dir: dir.join("ca"),
            node_tokens: dir.join("tokens"),
        },
        // Port 0: the kernel picks, and the controller says what it bound.
        // Tests run in parallel; a port probed free and bound later can be
        // taken by another test's controller in between.
        xds_addr: "127.0.0.1:0".parse().unwrap(),
        metrics_addr: "127.0.0.1:0".parse().unwrap(),
        server_names: vec!["weft-controller.istio-system.svc".into()],
        max_cert_ttl: Duration::from_secs(3600),
        mesh: Mesh::default(),
        // Small, so the three Address resources of these tests need two
        // parts for a client that understands the end-of-state marker.
        push_chunk: 2,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        app::run_reporting(cfg, |bound| {
            let _ = tx.send(bound);
        })
        .await
        .unwrap()
    });
    let bound = tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("the controller binds within 30 s")
        .expect("the controller binds");
    let (port, metrics) = (bound.xds.port(), bound.metrics.port());
    // The CA writes its root before anything listens.
    let root = std::fs::read_to_string(dir.join("ca/root-cert.pem")).unwrap();
    // By name, as the chart gives it: resolved at each dial.
    let cp = ControlPlaneAddress::fixed(
        format!("localhost:{port}"),
        "weft-controller.istio-system.svc",
        weft_hbone::tls::control_plane_client_config(&root).unwrap(),
    );
    Running {
        channel: connect(&cp).unwrap(),
        dir,
        metrics,
    }
}

fn csr_for(sa: &str) -> (Identity, IstioCertificateRequest) {
    let id = Identity::new("cluster.local", "shop", sa).unwrap();
    let req = CertRequest::new(&id).unwrap();
    (
        id,
        IstioCertificateRequest {
            csr: req.csr_pem,
            validity_duration: 600,
            metadata: None,
        },
    )
}

/// The CA signs only what the calling node is entitled to, and says why not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_signs_and_refuses() {
    let ctl = start("ca").await;
    let ch = || ctl.channel.clone();

    let (id, req) = csr_for("web");
    let resp = create_certificate(ch(), TOKEN_2, req.clone())
        .await
        .expect("node-2 runs web");
    assert_eq!(resp.cert_chain.len(), 2, "leaf and root");
    let (_, not_after, got) = weft_hbone::tls::leaf_info(&resp.cert_chain[0]).unwrap();
    assert_eq!(got, id);
    let life = not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        life <= Duration::from_secs(600),
        "lifetime as asked: {life:?}"
    );

    let refusals: Vec<(&str, Result<_, tonic::Status>, Code, &str)> = vec![
        (
            "another node's identity",
            create_certificate(ch(), TOKEN_1, req.clone()).await,
            Code::PermissionDenied,
            "node node-1 runs no pod",
        ),
        (
            "unknown token",
            create_certificate(ch(), "x-not-a-token-at-all", req.clone()).await,
            Code::Unauthenticated,
            "unknown token",
        ),
        (
            "no pod at all",
            create_certificate(ch(), TOKEN_2, csr_for("ghost").1).await,
            Code::PermissionDenied,
            "no pod with identity",
        ),
        (
            "garbage CSR",
            create_certificate(
                ch(),
                TOKEN_2,
                IstioCertificateRequest {
                    csr: "junk".into(),
                    ..req.clone()
                },
            )
            .await,
            Code::InvalidArgument,
            "request is invalid",
        ),
        (
            "impersonation mismatch",
            create_certificate(
                ch(),
                TOKEN_2,
                IstioCertificateRequest {
                    metadata: Some(prost_types::Struct {
                        fields: [(
                            "ImpersonatedIdentity".to_string(),
                            prost_types::Value {
                                kind: Some(prost_types::value::Kind::StringValue(
                                    "spiffe://cluster.local/ns/shop/sa/client".into(),
                                )),
                            },
                        )]
                        .into(),
                    }),
                    ..req.clone()
                },
            )
            .await,
            Code::InvalidArgument,
            "differs",
        ),
        (
            "oversize request",
            create_certificate(
                ch(),
                TOKEN_2,
                IstioCertificateRequest {
                    csr: "A".repeat(200 << 10),
                    ..req.clone()
                },
            )
            .await,
            Code::OutOfRange,
            "",
        ),
    ];
    let refused = refusals.len() as f64;
    for (name, got, code, text) in refusals {
        let err = got.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(err.message().contains(text), "{name}: {}", err.message());
    }
    // After all that, the CA still serves.
    create_certificate(ch(), TOKEN_2, csr_for("web").1)
        .await
        .expect("still serving");
    // Counted by outcome on the metrics port.
    let signed = ctl
        .metric("weft_controller_certificates_total{outcome=\"signed\"}")
        .await;
    let denied = ctl
        .metric("weft_controller_certificates_total{outcome=\"refused\"}")
        .await;
    assert_eq!(signed, 2.0);
    assert!(
        denied >= refused - 1.0,
        "{denied} of {refused} refusals counted"
    );
}

/// A workload proxy (a waypoint) gets a certificate for its own identity
/// only, the mesh view, no L4 policy (that is ztunnel's), and the routes of
/// the services it serves; another workload gets no routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_callers_get_their_own_scope() {
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                  metadata: {name: deny-all, namespace: shop}\nspec: {}\n";
    let waypoint = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
                    metadata: {name: waypoint, namespace: shop}\n\
                    spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n\
                    ---\n\
                    apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
                    metadata: {name: web, namespace: shop}\n\
                    spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}\n";
    let waypoint_pod = pod("waypoint-0", "node-1", "waypoint", "10.244.1.30").replace(
        "namespace: shop}",
        "namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}",
    );
    let mesh = manifests("v1").replace(
        "metadata: {name: web, namespace: shop}\nspec: {clusterIP",
        "metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec: {clusterIP",
    );
    let ctl = start_with(
        "scope",
        &format!("{mesh}---\n{policy}---\n{waypoint}---\n{waypoint_pod}"),
    )
    .await;
    let ch = || ctl.channel.clone();

    let (id, req) = csr_for("waypoint");
    let resp = create_certificate(ch(), TOKEN_WAYPOINT, req)
        .await
        .expect("its own identity");
    assert_eq!(
        weft_hbone::tls::leaf_info(&resp.cert_chain[0]).unwrap().2,
        id
    );
    let err = create_certificate(ch(), TOKEN_WAYPOINT, csr_for("web").1)
        .await
        .expect_err("another workload's identity");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("may not get a certificate for"),
        "{}",
        err.message()
    );

    let (tx, rx) = mpsc::channel(8);
    for ty in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        tx.send(DeltaDiscoveryRequest {
            type_url: ty.into(),
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .unwrap();
    }
    let mut stream = delta_ads(ch(), TOKEN_WAYPOINT, ReceiverStream::new(rx))
        .await
        .unwrap();
    let mut got = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let resp = next(&mut stream).await;
        got.insert(resp.type_url.clone(), resp.resources.len());
    }
    assert!(got[ADDRESS_TYPE] >= 3, "the mesh view: {got:?}");
    assert_eq!(
        got[AUTHORIZATION_TYPE], 0,
        "no L4 policy for a waypoint: {got:?}"
    );

    // A node agent on the same controller does get the policy.
    let (_tx, mut stream) = subscribe(ch(), Default::default()).await;
    let mut policies = 0;
    for _ in 0..2 {
        let resp = next(&mut stream).await;
        if resp.type_url == AUTHORIZATION_TYPE {
            policies = resp.resources.len();
        }
    }
    assert!(policies >= 1, "ztunnel gets the policy");
}

async fn next(stream: &mut Streaming<DeltaDiscoveryResponse>) -> DeltaDiscoveryResponse {
    // Generous: it returns as soon as the response comes, and CI's machine
    // can stall for a second under a parallel build.
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a response within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

fn ack(resp: &DeltaDiscoveryResponse, nack: Option<&str>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        error_detail: nack.map(|m| Status {
            code: 0,
            message: m.into(),
            details: vec![],
        }),
        ..DeltaDiscoveryRequest::default()
    }
}

async fn subscribe(
    ch: Channel,
    versions: std::collections::BTreeMap<String, String>,
) -> (
    mpsc::Sender<DeltaDiscoveryRequest>,
    Streaming<DeltaDiscoveryResponse>,
) {
    let (tx, rx) = mpsc::channel(8);
    for ty in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        tx.send(DeltaDiscoveryRequest {
            type_url: ty.into(),
            initial_resource_versions: if ty == ADDRESS_TYPE {
                versions.clone()
            } else {
                Default::default()
            },
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .unwrap();
    }
    let stream = delta_ads(ch, TOKEN_1, ReceiverStream::new(rx))
        .await
        .unwrap();
    (tx, stream)
}

/// Initial state for both types (the empty one too), then only what changed;
/// a NACK does not break the stream; a reconnect with current versions gets nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_ads_sends_only_changes() {
    let ctl = start("ads").await;
    let unauth = delta_ads(
        ctl.channel.clone(),
        "bad-token-0000000000",
        tokio_stream::empty(),
    )
    .await;
    assert_eq!(unauth.unwrap_err().code(), Code::Unauthenticated);

    let (tx, mut stream) = subscribe(ctl.channel.clone(), Default::default()).await;
    let first = next(&mut stream).await;
    assert_eq!(first.type_url, ADDRESS_TYPE);
    let mut names: Vec<&str> = first.resources.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "Kubernetes//Pod/shop/client",
            "Kubernetes//Pod/shop/web",
            "shop/web.shop.svc.cluster.local"
        ]
    );
    let versions = first
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    tx.send(ack(&first, None)).await.unwrap();
    let authz = next(&mut stream).await;
    assert_eq!(
        (authz.type_url.as_str(), authz.resources.len()),
        (AUTHORIZATION_TYPE, 0),
        "sent even when empty"
    );
    tx.send(ack(&authz, None)).await.unwrap();

    // One pod changes: one resource is pushed, not the world.
    write(&ctl.dir.join("manifests/mesh.yaml"), &manifests("v2"));
    let delta = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        delta.resources.len(),
        1,
        "{:?}",
        delta.resources.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    assert_eq!(delta.resources[0].name, "Kubernetes//Pod/shop/web");
    let Some(address::Type::Workload(w)) =
        Address::decode(delta.resources[0].resource.as_ref().unwrap().value.as_ref())
            .unwrap()
            .r#type
    else {
        panic!("not a workload");
    };
    assert_eq!(w.canonical_revision, "v2");
    // The client refuses it; the stream carries on.
    tx.send(ack(&delta, Some("Kubernetes//Pod/shop/web: test refusal")))
        .await
        .unwrap();
    let nack = "weft_controller_xds_nacks_total{type=\"address\"}";
    for _ in 0..1000 {
        if ctl.metric(nack).await == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ctl.metric(nack).await, 1.0, "the NACK is counted");
    assert_eq!(ctl.metric("weft_controller_xds_clients ").await, 1.0);
    assert_eq!(
        ctl.metric("weft_controller_resources{type=\"address\"}")
            .await,
        3.0,
        "two pods and a service"
    );

    // A removed pod is sent as a removal by name.
    let only_client = manifests("v2")
        .split("---\n")
        .filter(|d| !d.contains("kind: Pod\nmetadata: {name: web,"))
        .collect::<Vec<_>>()
        .join("---\n");
    write(&ctl.dir.join("manifests/mesh.yaml"), &only_client);
    let removal = next(&mut stream).await;
    assert_eq!(removal.removed_resources, ["Kubernetes//Pod/shop/web"]);
    assert!(removal.resources.is_empty());
    drop((tx, stream));

    // Reconnect holding the first versions: only what differs now comes back.
    let (_tx, mut stream) = subscribe(ctl.channel.clone(), versions).await;
    let again = next(&mut stream).await;
    assert!(
        again.resources.is_empty(),
        "{:?}",
        again.resources.iter().map(|r| &r.name).collect::<Vec<_>>()
    );
    assert_eq!(again.removed_resources, ["Kubernetes//Pod/shop/web"]);
}

/// A client that announces the end-of-state marker gets a large push in
/// parts: every part but the last says `partial`, the last carries the
/// removals and no marker. One that does not announce it (Istio's ztunnel,
/// and `delta_ads_sends_only_changes` above) gets each push whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_ads_in_parts_ends_with_the_marker() {
    let ctl = start("parts").await;
    let (tx, rx) = mpsc::channel(8);
    let node = weft_xds::client::node("ztunnel~node-1".into(), "node-1");
    assert!(
        node.client_features
            .contains(&weft_xds::END_OF_STATE_FEATURE.to_string())
    );
    for ty in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
        tx.send(DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: ty.into(),
            ..DeltaDiscoveryRequest::default()
        })
        .await
        .unwrap();
    }
    let mut stream = delta_ads(ctl.channel.clone(), TOKEN_1, ReceiverStream::new(rx))
        .await
        .unwrap();
    let first = next(&mut stream).await;
    assert_eq!(
        (first.type_url.as_str(), first.resources.len()),
        (ADDRESS_TYPE, 2)
    );
    assert_eq!(first.system_version_info, weft_xds::PARTIAL);
    tx.send(ack(&first, None)).await.unwrap();
    let second = next(&mut stream).await;
    assert_eq!(
        (second.type_url.as_str(), second.resources.len()),
        (ADDRESS_TYPE, 1)
    );
    assert_ne!(second.system_version_info, weft_xds::PARTIAL, "the end");
    assert_ne!(first.nonce, second.nonce, "each part is ACKed on its own");
    let mut names: Vec<String> = first
        .resources
        .iter()
        .chain(&second.resources)
        .map(|r| r.name.clone())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3, "the parts add up to the whole state");
    tx.send(ack(&second, None)).await.unwrap();
    let authz = next(&mut stream).await;
    assert_eq!(authz.type_url, AUTHORIZATION_TYPE);
    assert_ne!(
        authz.system_version_info,
        weft_xds::PARTIAL,
        "empty and whole"
    );
}

/// Istio's ztunnel with `XDS_ON_DEMAND=true`, as istiod serves it: "*" in
/// both lists subscribes to nothing, yet the caller's node's workloads come
/// unasked; names are asked by uid, `network/ip` or `namespace/hostname`; an
/// address name comes back as the resource with that alias, and as removed
/// (Istio's ztunnel waits for the very name it asked); a Service comes with
/// its workloads; an unknown name is answered removed; a type the controller
/// does not serve is answered empty and the stream carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_ads_on_demand_as_istio_asks() {
    let mesh = manifests("v1").replace("labels: {version: v1}", "labels: {app: web, version: v1}");
    let ctl = start_with("ondemand", &mesh).await;
    let client = "Kubernetes//Pod/shop/client".to_string();
    let web = "Kubernetes//Pod/shop/web".to_string();
    let svc = "shop/web.shop.svc.cluster.local".to_string();
    let names = |r: &DeltaDiscoveryResponse| {
        let mut v: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
        v.sort();
        v
    };
    let (tx, rx) = mpsc::channel(8);
    let ask = |names: &[&str]| DeltaDiscoveryRequest {
        type_url: ADDRESS_TYPE.into(),
        resource_names_subscribe: names.iter().map(|n| n.to_string()).collect(),
        ..DeltaDiscoveryRequest::default()
    };
    tx.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec!["*".into()],
        ..ask(&["*"])
    })
    .await
    .unwrap();
    let mut stream = delta_ads(ctl.channel.clone(), TOKEN_1, ReceiverStream::new(rx))
        .await
        .unwrap();
    let own = next(&mut stream).await;
    assert_eq!(
        names(&own),
        [client.as_str()],
        "node-1's own workload, unasked"
    );
    assert_eq!(own.resources[0].aliases, ["/10.244.1.10"]);

    tx.send(ask(&["/10.244.2.10"])).await.unwrap();
    let by_ip = next(&mut stream).await;
    assert_eq!(names(&by_ip), [web.as_str()]);
    assert_eq!(by_ip.resources[0].aliases, ["/10.244.2.10"]);
    assert_eq!(
        by_ip.removed_resources,
        ["/10.244.2.10"],
        "the asked name, released"
    );

    tx.send(ask(&["/10.96.0.10"])).await.unwrap();
    let by_vip = next(&mut stream).await;
    assert_eq!(
        names(&by_vip),
        [svc.as_str()],
        "the pod behind it was sent already"
    );
    assert_eq!(
        by_vip.removed_resources,
        ["/10.96.0.10"],
        "the asked name, released"
    );
    let decoded = Address::decode(
        by_vip.resources[0]
            .resource
            .as_ref()
            .unwrap()
            .value
            .as_ref(),
    )
    .unwrap();
    match decoded.r#type {
        Some(address::Type::Service(s)) => {
            assert!(s.canonical, "a Kubernetes Service is canonical")
        }
        other => panic!("not a service: {other:?}"),
    }

    tx.send(ask(&["/10.9.9.9"])).await.unwrap();
    let unknown = next(&mut stream).await;
    assert!(unknown.resources.is_empty());
    assert_eq!(unknown.removed_resources, ["/10.9.9.9"]);

    let cluster = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    tx.send(DeltaDiscoveryRequest {
        type_url: cluster.into(),
        ..DeltaDiscoveryRequest::default()
    })
    .await
    .unwrap();
    let empty = next(&mut stream).await;
    assert_eq!(empty.type_url, cluster);
    assert!(empty.resources.is_empty() && empty.removed_resources.is_empty());
    tx.send(ack(&empty, None)).await.unwrap();

    // Unsubscribing the addresses removes what they brought; asking for the
    // service by hostname brings it back with the pod behind it (and the
    // stream still answers after the unserved type).
    tx.send(DeltaDiscoveryRequest {
        resource_names_unsubscribe: vec!["/10.244.2.10".into(), "/10.96.0.10".into()],
        ..ask(&[])
    })
    .await
    .unwrap();
    let gone = next(&mut stream).await;
    let mut removed = gone.removed_resources.clone();
    removed.sort();
    assert_eq!(removed, [web.clone(), svc.clone()]);
    tx.send(ask(&[&svc])).await.unwrap();
    let with_pods = next(&mut stream).await;
    assert_eq!(names(&with_pods), [web, svc]);
}

/// `/debug/status` shows each policy resource's Accepted condition, with the
/// field a refusal is about; `/metrics` counts the refused resources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_metrics_endpoint() {
    let ctl = start("status").await;
    write(
        &ctl.dir.join("manifests/policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo, namespace: shop}\nspec: {action: ALOW}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: fine, namespace: shop}\nspec: {action: DENY, rules: [{from: [{source: {namespaces: [ops]}}]}]}\n",
    );
    let mut status = serde_json::Value::Null;
    for _ in 0..500 {
        let (line, body) = ctl.get("/debug/status").await;
        assert!(line.contains("200"), "{line}");
        status = serde_json::from_str(&body).unwrap();
        if status.as_array().is_some_and(|a| a.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let condition = |name: &str| {
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .map(|s| s["conditions"][0].clone())
            .unwrap_or_else(|| panic!("no status for {name}: {status}"))
    };
    let typo = condition("typo");
    assert_eq!(typo["status"], "False");
    assert_eq!(typo["reason"], "Invalid");
    assert!(
        typo["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.action: unknown action \"ALOW\""),
        "{typo}"
    );
    assert_eq!(condition("fine")["status"], "True");
    assert_eq!(ctl.metric("weft_controller_config_errors ").await, 1.0);
    assert_eq!(
        ctl.metric("weft_controller_resources{type=\"authorization\"}")
            .await,
        1.0,
        "the valid policy is served"
    );
    let (line, _) = ctl.get("/nope").await;
    assert!(line.contains("404"), "{line}");
}
