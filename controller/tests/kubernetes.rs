//! The Kubernetes source against kube's mock API (tower-test): list and watch
//! events in, the typed snapshot (and its translation) out; status patches,
//! TokenReview and the CA Secret as the API server sees them.

#![expect(clippy::unwrap_used, reason = "test helpers panic on setup failures")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use kube::Client;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_api::TunnelProtocol;
use weft_controller::Snapshot;
use weft_controller::auth::{AuthError, Caller};
use weft_controller::kubernetes::{self, KubeSource, StatusWriter, TokenReviewer};
use weft_controller::translate::{self, Mesh};

type Body = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;
type Handle = tower_test::mock::Handle<Request<kube::client::Body>, Response<Body>>;
type Events = mpsc::Sender<Result<Frame<Bytes>, Infallible>>;

fn body(bytes: Vec<u8>) -> Body {
    let (tx, rx) = mpsc::channel(1);
    tx.try_send(Ok(Frame::data(Bytes::from(bytes)))).unwrap();
    StreamBody::new(ReceiverStream::new(rx))
}

fn reply(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn not_found(what: &str) -> Response<Body> {
    reply(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": format!("{what} not found")}),
    )
}

/// A pretend API server: lists, watches the test can push events into,
/// TokenReview, Secrets, and a record of every write.
#[derive(Clone, Default)]
struct Fake {
    /// Collection path → items.
    lists: Arc<Mutex<HashMap<String, Vec<Value>>>>,
    /// Collection path → the open watch's event stream.
    watches: Arc<Mutex<HashMap<String, Events>>>,
    /// Secret name → object.
    secrets: Arc<Mutex<HashMap<String, Value>>>,
    /// Every non-GET request: (method, path, body).
    writes: Arc<Mutex<Vec<(Method, String, Value)>>>,
    /// Another replica's Secret: a creation stores it instead and gets 409 Conflict.
    race_winner: Arc<Mutex<Option<Value>>>,
    /// Object path → object, for single GETs.
    objects: Arc<Mutex<HashMap<String, Value>>>,
    /// Every single-object GET served from `objects`, by path.
    reads: Arc<Mutex<Vec<String>>>,
    /// Every list served, as `path?query`.
    listed: Arc<Mutex<Vec<String>>>,
    /// Set: the API server stops answering (requests are held, unanswered).
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl Fake {
    fn list(&self, path: &str, items: Vec<Value>) {
        self.lists.lock().unwrap().insert(path.into(), items);
    }

    fn writes(&self) -> Vec<(Method, String, Value)> {
        self.writes.lock().unwrap().clone()
    }

    /// The bodies of the PATCHes sent to `path`, in order.
    fn patches(&self, path: &str) -> Vec<Value> {
        self.writes()
            .into_iter()
            .filter(|(m, p, _)| m == Method::PATCH && p == path)
            .map(|(_, _, b)| b)
            .collect()
    }

    /// The queries `path` was listed with.
    fn list_queries(&self, path: &str) -> Vec<String> {
        self.listed
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix(&format!("{path}?")).map(str::to_string))
            .collect()
    }

    /// How many times `path` was read.
    fn reads(&self, path: &str) -> usize {
        self.reads
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }

    /// Sends one watch event on `path`, once its watch is open.
    async fn event(&self, path: &str, kind: &str, object: Value) {
        for _ in 0..200 {
            let tx = self.watches.lock().unwrap().get(path).cloned();
            if let Some(tx) = tx {
                let line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
                tx.send(Ok(Frame::data(Bytes::from(
                    [line, b"\n".to_vec()].concat(),
                ))))
                .await
                .unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no watch opened on {path}");
    }

    /// Ends the watch on `path` as an expired resource version does (410
    /// Gone): the client lists the kind again.
    async fn expire(&self, path: &str) {
        self.event(
            path,
            "ERROR",
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": "too old"}),
        )
        .await;
    }

    fn serve(self, mut handle: Handle) {
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                if self.hang.load(std::sync::atomic::Ordering::Acquire) {
                    held.push(send);
                    continue;
                }
                let resp = self.answer(req).await;
                send.send_response(resp);
            }
        });
    }

    async fn answer(&self, req: Request<kube::client::Body>) -> Response<Body> {
        let (parts, b) = req.into_parts();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query().unwrap_or_default().to_string();
        let bytes = b.collect().await.unwrap().to_bytes();
        let sent: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if parts.method != Method::GET {
            self.writes
                .lock()
                .unwrap()
                .push((parts.method.clone(), path.clone(), sent.clone()));
        }
        if parts.method == Method::GET && query.contains("watch=true") {
            let (tx, rx) = mpsc::channel(16);
            self.watches.lock().unwrap().insert(path, tx);
            return Response::new(StreamBody::new(ReceiverStream::new(rx)));
        }
        // Leases: create, and replace with optimistic concurrency.
        if path.starts_with("/apis/coordination.k8s.io/v1/") {
            let conflict = || {
                reply(
                    StatusCode::CONFLICT,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"}),
                )
            };
            let mut objects = self.objects.lock().unwrap();
            if parts.method == Method::POST {
                let at = format!("{path}/{}", sent["metadata"]["name"].as_str().unwrap());
                if objects.contains_key(&at) {
                    return conflict();
                }
                let mut stored = sent.clone();
                stored["metadata"]["resourceVersion"] = json!("1");
                objects.insert(at, stored.clone());
                return reply(StatusCode::CREATED, &stored);
            }
            if parts.method == Method::PUT {
                let Some(current) = objects.get(&path) else {
                    return not_found(&path);
                };
                let rv = current["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap()
                    .to_string();
                if sent["metadata"]["resourceVersion"].as_str() != Some(rv.as_str()) {
                    return conflict();
                }
                let mut stored = sent.clone();
                stored["metadata"]["resourceVersion"] =
                    json!((rv.parse::<u64>().unwrap() + 1).to_string());
                objects.insert(path.clone(), stored.clone());
                return reply(StatusCode::OK, &stored);
            }
            if let Some(o) = objects.get(&path) {
                return reply(StatusCode::OK, o);
            }
            return not_found(&path);
        }
        if parts.method == Method::GET
            && let Some(o) = self.objects.lock().unwrap().get(&path)
        {
            self.reads.lock().unwrap().push(path.clone());
            return reply(StatusCode::OK, o);
        }
        if let Some(items) = self.lists.lock().unwrap().get(&path) {
            self.listed.lock().unwrap().push(format!("{path}?{query}"));
            return reply(
                StatusCode::OK,
                &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            );
        }
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            let token = sent["spec"]["token"].as_str().unwrap_or_default();
            // As the API server: a token is only valid for the audiences it
            // was minted for, and the review says which matched.
            let for_ca = sent["spec"]["audiences"]
                .as_array()
                .is_some_and(|a| a.iter().any(|v| v == "istio-ca"));
            let token = if for_ca || token == "any-audience" {
                token
            } else {
                ""
            };
            let status = match token {
                "any-audience" => json!({"authenticated": true, "audiences": ["vault"], "user": {
                    "username": "system:serviceaccount:shop:a"}}),
                "node-token" => json!({"authenticated": true, "user": {
                    "username": "system:serviceaccount:istio-system:ztunnel",
                    "extra": {"authentication.kubernetes.io/node-name": ["n1"]}}, "audiences": ["istio-ca"]}),
                "pod-token" => json!({"authenticated": true, "user": {
                    "username": "system:serviceaccount:istio-system:ztunnel",
                    "extra": {"authentication.kubernetes.io/pod-name": ["ztunnel-abc"]}}, "audiences": ["istio-ca"]}),
                "app-token" => json!({"authenticated": true, "user": {
                    "username": "system:serviceaccount:shop:a",
                    "extra": {"authentication.kubernetes.io/node-name": ["n1"]}}, "audiences": ["istio-ca"]}),
                _ => json!({"authenticated": false, "error": "invalid bearer token"}),
            };
            let mut review = sent.clone();
            review["status"] = status;
            return reply(StatusCode::CREATED, &review);
        }
        if let Some(name) = path.strip_prefix("/api/v1/namespaces/istio-system/secrets/") {
            return match self.secrets.lock().unwrap().get(name) {
                Some(s) => reply(StatusCode::OK, s),
                None => not_found(name),
            };
        }
        if path == "/api/v1/namespaces/istio-system/secrets" && parts.method == Method::POST {
            if let Some(winner) = self.race_winner.lock().unwrap().take() {
                self.secrets
                    .lock()
                    .unwrap()
                    .insert("istio-ca-secret".into(), winner);
                return reply(
                    StatusCode::CONFLICT,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409, "message": "exists"}),
                );
            }
            let name = sent["metadata"]["name"].as_str().unwrap().to_string();
            self.secrets.lock().unwrap().insert(name, sent.clone());
            return reply(StatusCode::CREATED, &sent);
        }
        if parts.method == Method::POST && path.ends_with("/events") {
            return reply(StatusCode::CREATED, &sent);
        }
        if parts.method == Method::PATCH && !path.ends_with("/status") {
            // Server-side apply: the object as applied.
            return reply(StatusCode::OK, &sent);
        }
        if parts.method == Method::PATCH && path.ends_with("/status") {
            let segs: Vec<&str> = path.split('/').collect();
            let (ns, name) = (segs[5], segs[7]);
            return reply(
                StatusCode::OK,
                &json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": name, "namespace": ns}}),
            );
        }
        not_found(&path)
    }
}

fn mock_client() -> (Client, Fake) {
    let (svc, handle) = tower_test::mock::pair::<Request<kube::client::Body>, Response<Body>>();
    let fake = Fake::default();
    fake.clone().serve(handle);
    (Client::new(svc, "default"), fake)
}

fn meta(name: &str, ns: Option<&str>, rv: &str) -> Value {
    let mut m = json!({"name": name, "resourceVersion": rv, "generation": 3,
                       "managedFields": [{"manager": "kubectl"}]});
    if let Some(ns) = ns {
        m["namespace"] = json!(ns);
    }
    m
}

fn namespace(name: &str, ambient: bool, rv: &str) -> Value {
    let mut m = meta(name, None, rv);
    if ambient {
        m["labels"] = json!({"istio.io/dataplane-mode": "ambient"});
    }
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": m})
}

fn pod(ns: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta(name, Some(ns), "1"),
           "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app"}]},
           "status": {"podIP": ip}})
}

/// Whether one of `problems` is about `object` (`Kind namespace/name`).
fn names(problems: &[String], object: &str) -> bool {
    problems
        .iter()
        .any(|p| p.strip_prefix(object).is_some_and(|r| r.starts_with(':')))
}

/// Polls `source` until a snapshot and its problems satisfy `want` (for
/// at most 5 s), and returns them; fails with `what` otherwise.
async fn poll_until(
    source: &mut KubeSource,
    what: &str,
    want: impl Fn(&Snapshot, &[String]) -> bool,
) -> (Arc<Snapshot>, Vec<String>) {
    for _ in 0..500 {
        if let Some((snap, problems)) = source.poll()
            && want(&snap, &problems)
        {
            return (snap, problems);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}");
}

fn policy(kind: &str, ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": meta(name, Some(ns), "1"), "spec": spec})
}

const AP: &str = "/apis/security.istio.io/v1/authorizationpolicies";
const PA: &str = "/apis/security.istio.io/v1/peerauthentications";

/// Lists and watch events become the same snapshot the manifests give:
/// capture follows a namespace label change, a deleted pod leaves, an Istio
/// object that does not read is named and left out (or keeps its last good
/// version); statuses are patched once per change, with the field of a
/// refusal. Only what the events name is read again, and a new list (the
/// watch expired) replaces its kind whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_make_the_snapshot_and_status_goes_back() {
    let (client, fake) = mock_client();
    fake.list(
        "/api/v1/namespaces",
        vec![
            namespace("shop", true, "1"),
            namespace("legacy", false, "1"),
        ],
    );
    fake.list(
        "/api/v1/pods",
        vec![
            pod("shop", "a", "n1", "10.244.1.10"),
            pod("legacy", "b", "n2", "10.244.2.10"),
            pod("istio-system", "ztunnel-abc", "n2", "10.244.2.2"),
        ],
    );
    fake.list(
        "/api/v1/services",
        vec![json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("web", Some("shop"), "1"),
                    "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "a"}, "ports": [{"port": 80}]}})],
    );
    fake.list("/api/v1/nodes", vec![]);
    // The mesh config: only the ConfigMap named `istio` is asked for.
    fake.list(
        "/api/v1/configmaps",
        vec![json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("istio", Some("istio-system"), "1"),
                    "data": {"mesh": "extensionProviders: []"}})],
    );
    fake.list(
        AP,
        vec![
            policy("AuthorizationPolicy", "shop", "deny-ops", json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["ops"]}}]}]})),
            policy("AuthorizationPolicy", "shop", "typo", json!({"action": "PERMIT"})),
        ],
    );
    fake.list(
        PA,
        vec![policy(
            "PeerAuthentication",
            "shop",
            "bad",
            json!({"mtsl": {"mode": "STRICT"}}),
        )],
    );

    let mut source = KubeSource::start(client.clone());
    tokio::time::timeout(
        Duration::from_secs(10),
        source.ready(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    // The reflectors settle (every list applied); then nothing changes.
    let (mut snap, mut problems) = source.poll().unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match source.poll() {
            Some(next) => (snap, problems) = next,
            None => break,
        }
    }
    assert_eq!(snap.namespaces.len(), 2);
    assert_eq!(snap.pods.len(), 3);
    assert!(snap.config_maps.contains_key("istio-system/istio"));
    let queries = fake.list_queries("/api/v1/configmaps");
    assert!(
        !queries.is_empty()
            && queries
                .iter()
                .all(|q| q.contains("fieldSelector=metadata.name%3Distio")),
        "{queries:?}"
    );
    assert!(
        snap.pods["shop/a"].metadata.managed_fields.is_none()
            || snap.pods["shop/a"]
                .metadata
                .managed_fields
                .as_ref()
                .unwrap()
                .is_empty(),
        "managed fields are not kept"
    );
    assert_eq!(snap.authorization_policies.len(), 2);
    assert!(snap.peer_authentications.is_empty());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with("PeerAuthentication shop/bad:") && problems[0].contains("mtsl"),
        "{problems:?}"
    );

    let t = translate::translate(&snap, &Mesh::default(), None);
    let proto = |cfg: &weft_api::LocalConfig, name: &str| {
        cfg.workloads
            .iter()
            .find(|w| w.name == name)
            .map(|w| w.protocol)
    };
    assert_eq!(proto(&t.config, "a"), Some(TunnelProtocol::Hbone));
    assert_eq!(proto(&t.config, "b"), Some(TunnelProtocol::None));
    assert_eq!(t.config.services.len(), 1);
    assert_eq!(t.config.policies.len(), 1, "deny-ops; typo is refused");
    assert!(
        t.errors.iter().any(|e| e
            .to_string()
            .starts_with("AuthorizationPolicy shop/typo: spec.action")),
        "{:?}",
        t.errors
    );

    // Status goes back: one patch per resource, the refusal names the field.
    let mut writer = StatusWriter::new(client.clone());
    let statuses: Vec<_> = t
        .policies
        .statuses
        .iter()
        .map(|s| (s.clone(), Some(3)))
        .collect();
    writer.write(&statuses).await;
    let patches: Vec<_> = fake
        .writes()
        .into_iter()
        .filter(|(m, _, _)| *m == Method::PATCH)
        .collect();
    assert_eq!(patches.len(), 2, "{patches:?}");
    // The refusal is also a Warning Event on the resource, for `kubectl
    // describe`; the accepted one gets none.
    let events = |f: &Fake| -> Vec<Value> {
        f.writes()
            .into_iter()
            .filter(|(m, p, _)| *m == Method::POST && p.ends_with("/events"))
            .map(|(_, p, b)| {
                assert_eq!(p, "/apis/events.k8s.io/v1/namespaces/shop/events");
                b
            })
            .collect()
    };
    let sent = events(&fake);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let e = &sent[0];
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "Invalid");
    assert_eq!(e["regarding"]["kind"], "AuthorizationPolicy");
    assert_eq!(e["regarding"]["name"], "typo");
    assert_eq!(e["regarding"]["apiVersion"], "security.istio.io/v1");
    assert!(
        e["note"].as_str().unwrap().starts_with("spec.action:"),
        "{e}"
    );
    assert_eq!(e["reportingController"], "weft.dev/controller");
    let (method, path, body) = patches
        .iter()
        .find(|(_, p, _)| p.contains("/typo/"))
        .unwrap();
    assert_eq!(*method, Method::PATCH);
    assert_eq!(
        path,
        "/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies/typo/status"
    );
    let cond = &body["status"]["conditions"][0];
    assert_eq!(cond["type"], "Accepted");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "Invalid");
    assert_eq!(cond["observedGeneration"], 3);
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.action:"),
        "{cond}"
    );
    let (_, _, ok) = patches
        .iter()
        .find(|(_, p, _)| p.contains("/deny-ops/"))
        .unwrap();
    assert_eq!(ok["status"]["conditions"][0]["status"], "True");
    // Istio's own condition type beside ours, so `kubectl wait
    // --for=condition=ZtunnelAccepted` works as with istiod.
    assert_eq!(ok["status"]["conditions"][1]["type"], "ZtunnelAccepted");
    assert_eq!(ok["status"]["conditions"][1]["status"], "True");
    assert_eq!(ok["status"]["conditions"][2]["type"], "Reconciled");
    assert_eq!(body["status"]["conditions"][1]["type"], "ZtunnelAccepted");
    assert_eq!(body["status"]["conditions"][1]["status"], "False");
    writer.write(&statuses).await;
    assert_eq!(
        fake.writes().len(),
        3,
        "unchanged statuses are not written again, nor reported again"
    );

    // Watch events: the legacy namespace joins the mesh, pod a goes away.
    fake.event(
        "/api/v1/namespaces",
        "MODIFIED",
        namespace("legacy", true, "2"),
    )
    .await;
    fake.event(
        "/api/v1/pods",
        "DELETED",
        pod("shop", "a", "n1", "10.244.1.10"),
    )
    .await;
    let (snap, _) = poll_until(
        &mut source,
        "the watch events reach the snapshot",
        |s, _| !s.pods.contains_key("shop/a") && s.namespaces["legacy"].metadata.labels.is_some(),
    )
    .await;
    let t = translate::translate(&snap, &Mesh::default(), Some(&t));
    assert_eq!(
        proto(&t.config, "b"),
        Some(TunnelProtocol::Hbone),
        "captured by the label"
    );
    assert_eq!(proto(&t.config, "a"), None, "deleted");

    // Only what the events name is read again: an untouched object is the
    // very one the last snapshot had.
    let (before_b, before_policy) = (
        snap.pods["legacy/b"].clone(),
        snap.authorization_policies["shop/deny-ops"].clone(),
    );
    drop(snap);
    // A policy that stops reading keeps its last version, and is named;
    // once deleted, both go.
    let mut broken = policy(
        "AuthorizationPolicy",
        "shop",
        "deny-ops",
        json!({"actoin": "DENY"}),
    );
    broken["metadata"]["resourceVersion"] = json!("2");
    fake.event(AP, "MODIFIED", broken.clone()).await;
    let (snap, _) = poll_until(
        &mut source,
        "the unreadable version is named",
        |_, problems| names(problems, "AuthorizationPolicy shop/deny-ops"),
    )
    .await;
    assert!(
        Arc::ptr_eq(&snap.pods["legacy/b"], &before_b),
        "an untouched pod is shared"
    );
    assert!(
        Arc::ptr_eq(
            &snap.authorization_policies["shop/deny-ops"],
            &before_policy
        ),
        "the last good version is kept"
    );
    drop(snap);
    fake.event(AP, "DELETED", broken).await;
    let (_, problems) = poll_until(&mut source, "a deleted policy leaves", |s, _| {
        !s.authorization_policies.contains_key("shop/deny-ops")
    })
    .await;
    assert!(
        !problems.iter().any(|p| p.contains("shop/deny-ops")),
        "its problem leaves with it: {problems:?}"
    );

    // One that never read, deleted while the watch was down: the new list
    // lacks it, and its problem goes with it.
    let ghost = policy(
        "AuthorizationPolicy",
        "shop",
        "ghost",
        json!({"actoin": "DENY"}),
    );
    fake.event(AP, "ADDED", ghost).await;
    poll_until(
        &mut source,
        "a policy that never read is named",
        |_, problems| names(problems, "AuthorizationPolicy shop/ghost"),
    )
    .await;
    fake.list(
        AP,
        vec![policy(
            "AuthorizationPolicy",
            "shop",
            "typo",
            json!({"action": "PERMIT"}),
        )],
    );
    fake.expire(AP).await;
    poll_until(
        &mut source,
        "a new list forgets the problems of what it lacks",
        |_, problems| !problems.iter().any(|p| p.contains("shop/ghost")),
    )
    .await;

    // The watch expires (410 Gone): the pods are listed again, and the
    // snapshot takes the new list whole, what it lacks gone.
    fake.list(
        "/api/v1/pods",
        vec![
            pod("istio-system", "ztunnel-abc", "n2", "10.244.2.2"),
            pod("shop", "c", "n1", "10.244.1.12"),
        ],
    );
    fake.expire("/api/v1/pods").await;
    poll_until(&mut source, "a new list replaces the kind whole", |s, _| {
        s.pods.keys().eq(["istio-system/ztunnel-abc", "shop/c"])
    })
    .await;

    // Node agents: by node-name in the token, or by the pod it names.
    let reviewer = TokenReviewer::new(
        client,
        "istio-system/ztunnel",
        "cluster.local",
        Some(source.pods()),
    );
    let node = |c: Caller| c.node().map(str::to_string);
    let n1 = Some("n1".to_string());
    assert_eq!(node(reviewer.authenticate("node-token").await.unwrap()), n1);
    assert_eq!(
        node(reviewer.authenticate("pod-token").await.unwrap()).as_deref(),
        Some("n2")
    );
    let reviews = |f: &Fake| {
        f.writes()
            .iter()
            .filter(|(_, p, _)| p.ends_with("tokenreviews"))
            .count()
    };
    assert_eq!(reviews(&fake), 2);
    assert_eq!(node(reviewer.authenticate("node-token").await.unwrap()), n1);
    assert_eq!(reviews(&fake), 2, "a reviewed token is cached");
    // Another service account's token is that workload acting as itself.
    match reviewer.authenticate("app-token").await {
        Ok(c @ Caller::Workload { .. }) => {
            assert_eq!(c.to_string(), "spiffe://cluster.local/ns/shop/sa/a")
        }
        other => panic!("an app's token makes a workload caller: {other:?}"),
    }
    match reviewer.authenticate("any-audience").await {
        Err(AuthError::Rejected(m)) => assert!(m.contains("not for audience istio-ca"), "{m}"),
        other => panic!("a token for another audience: {other:?}"),
    }
    match reviewer.authenticate("forged").await {
        Err(AuthError::Rejected(m)) => assert!(m.contains("invalid bearer token"), "{m}"),
        other => panic!("a forged token: {other:?}"),
    }
}

/// The CA root lives in a Secret: created on first start, read back after;
/// a plugged-in `cacerts` wins; a lost creation race reads the winner's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_root_in_a_secret() {
    let ttl = Duration::from_secs(3600);
    let (client, fake) = mock_client();
    let first = kubernetes::load_or_create_ca(client.clone(), "istio-system", "cluster.local", ttl)
        .await
        .unwrap();
    let created = fake
        .secrets
        .lock()
        .unwrap()
        .get("istio-ca-secret")
        .cloned()
        .unwrap();
    assert_eq!(created["type"], "istio.io/ca-root");
    assert!(created["data"]["root-key.pem"].is_string());
    let again = kubernetes::load_or_create_ca(client.clone(), "istio-system", "cluster.local", ttl)
        .await
        .unwrap();
    assert_eq!(
        again.root_pem(),
        first.root_pem(),
        "the stored root is reused"
    );
    let creates = |f: &Fake| {
        f.writes()
            .iter()
            .filter(|(m, _, _)| *m == Method::POST)
            .count()
    };
    assert_eq!(creates(&fake), 1);

    // A creation race: another replica stores its root between our read and our create.
    let (client, fake) = mock_client();
    *fake.race_winner.lock().unwrap() = Some(created.clone());
    let ca = kubernetes::load_or_create_ca(client, "istio-system", "cluster.local", ttl)
        .await
        .unwrap();
    assert_eq!(ca.root_pem(), first.root_pem(), "the winner's root is used");

    // A plugged-in CA in `cacerts` is used as is.
    let (client, fake) = mock_client();
    let root = weft_hbone::ca::Ca::generate("cluster.local").unwrap();
    let data =
        |s: &str| serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).unwrap();
    fake.secrets.lock().unwrap().insert(
        "cacerts".into(),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cacerts", "namespace": "istio-system"},
               "data": {"ca-cert.pem": data(root.cert_pem()), "ca-key.pem": data(&root.key_pem()), "root-cert.pem": data(root.cert_pem())}}),
    );
    let plugged = kubernetes::load_or_create_ca(client, "istio-system", "cluster.local", ttl)
        .await
        .unwrap();
    assert_eq!(plugged.root_pem(), root.cert_pem());
    assert_eq!(creates(&fake), 0, "nothing is created when cacerts exists");
}

/// The waypoint deployer the controller runs, over the mock API.
fn deployer(client: Client) -> weft_controller::deploy::Deployer {
    weft_controller::deploy::Deployer::new(
        client,
        weft_controller::deploy::Settings {
            image: "weft/waypoint:dev".into(),
            xds_address: "weft-controller.istio-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
        },
    )
}

/// Kubernetes mode: a waypoint Gateway gets a ServiceAccount, Service and
/// Deployment owned by it (server-side apply as weft-controller, non-root,
/// never captured) and its status; nothing is written again unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_deployed_for_its_gateway() {
    use weft_controller::deploy::WaypointGateway;
    let (client, fake) = mock_client();
    let mut deployer = deployer(client);
    let gw = WaypointGateway {
        namespace: "shop".into(),
        name: "waypoint".into(),
        uid: "uid-1".into(),
        ..WaypointGateway::default()
    };
    deployer.apply(std::slice::from_ref(&gw)).await;
    let writes = fake.writes();
    let find = |suffix: &str| {
        writes
            .iter()
            .find(|(m, p, _)| *m == Method::PATCH && p.ends_with(suffix))
            .map(|(_, _, body)| body.clone())
            .unwrap_or_else(|| panic!("no PATCH of {suffix}: {writes:?}"))
    };
    let sa = find("/api/v1/namespaces/shop/serviceaccounts/waypoint");
    let svc = find("/api/v1/namespaces/shop/services/waypoint");
    let dep = find("/apis/apps/v1/namespaces/shop/deployments/waypoint");
    let pdb = find("/apis/policy/v1/namespaces/shop/poddisruptionbudgets/waypoint");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let status =
        find("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint/status");
    for obj in [&sa, &svc, &dep] {
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["uid"], "uid-1",
            "{obj}"
        );
        assert_eq!(obj["metadata"]["labels"]["istio.io/dataplane-mode"], "none");
    }
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "waypoint");
    assert_eq!(
        pod["containers"][0]["securityContext"]["runAsNonRoot"],
        true
    );
    assert_eq!(pod["containers"][0]["image"], "weft/waypoint:dev");
    assert_eq!(svc["spec"]["ports"][0]["port"], 15008);
    let types: Vec<&str> = status["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["Accepted", "Programmed"]);
    assert_eq!(
        status["status"]["addresses"][0]["value"],
        "waypoint.shop.svc.cluster.local"
    );
    let n = fake.writes().len();
    deployer.apply(std::slice::from_ref(&gw)).await;
    assert_eq!(fake.writes().len(), n, "unchanged: nothing written again");
}

/// HTTPRoute status as Gateway API defines it: one `status.parents` entry
/// per Service parent under the `istio-waypoint` class's controller name,
/// with Accepted and ResolvedRefs; another controller's entry is kept; an
/// unchanged status is not written again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_route_status_parents() {
    use weft_controller::policy::Status;
    let (client, fake) = mock_client();
    let path = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/reviews/status";
    let other = json!({"parentRef": {"name": "ingress", "kind": "Gateway"},
                       "controllerName": "example.com/gateway", "conditions": []});
    fake.objects.lock().unwrap().insert(
        path.into(),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": meta("reviews", Some("shop"), "1"),
               "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 9080},
                                       {"name": "ingress", "kind": "Gateway"}]},
               "status": {"parents": [other.clone()]}}),
    );
    let mut writer = StatusWriter::new(client);
    let status = |accepted, message: &str| Status {
        kind: "HTTPRoute",
        namespace: "shop".into(),
        name: "reviews".into(),
        accepted,
        reason: if accepted { "Accepted" } else { "Invalid" },
        message: message.into(),
        condition: "",
    };
    writer
        .write(&[(status(true, "routes served to the waypoint"), Some(3))])
        .await;
    let sent = fake.patches(path);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let parents = sent[0]["status"]["parents"].as_array().unwrap().clone();
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert_eq!(parents[0], other, "another controller's entry is kept");
    let ours = &parents[1];
    assert_eq!(ours["controllerName"], "istio.io/mesh-controller");
    assert_eq!(ours["parentRef"]["name"], "reviews");
    assert_eq!(ours["conditions"][0]["type"], "Accepted");
    assert_eq!(ours["conditions"][0]["status"], "True");
    assert_eq!(ours["conditions"][0]["observedGeneration"], 3);
    assert_eq!(ours["conditions"][1]["type"], "ResolvedRefs");
    assert_eq!(ours["conditions"][1]["status"], "True");

    writer
        .write(&[(status(true, "routes served to the waypoint"), Some(3))])
        .await;
    assert_eq!(fake.patches(path).len(), 1, "unchanged: not written again");
    assert_eq!(fake.reads(path), 1, "nor read again");

    writer
        .write(&[(
            status(
                false,
                "spec.rules[0].backendRefs[0].namespace: \"other\" is another namespace; a cross-namespace backend needs a ReferenceGrant, which Weft does not read yet",
            ),
            Some(4),
        )])
        .await;
    let sent = fake.patches(path);
    assert_eq!(sent.len(), 2);
    let ours = &sent[1]["status"]["parents"][1];
    assert_eq!(ours["conditions"][0]["status"], "False", "not served");
    assert_eq!(ours["conditions"][1]["status"], "False");
    assert_eq!(ours["conditions"][1]["reason"], "RefNotPermitted");
    assert!(
        ours["conditions"][1]["message"]
            .as_str()
            .unwrap()
            .contains("backendRefs[0].namespace")
    );
}

/// A Service's binding is written as Istio writes it: one
/// `istio.io/WaypointBound` condition, other conditions kept; it is
/// removed when the binding goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_waypoint_bound_condition() {
    use weft_controller::policy::Status;
    let (client, fake) = mock_client();
    let path = "/api/v1/namespaces/shop/services/web/status";
    let other =
        json!({"type": "example.com/Ready", "status": "True", "reason": "Fine", "message": ""});
    fake.objects.lock().unwrap().insert(
        path.into(),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": meta("web", Some("shop"), "1"),
               "status": {"conditions": [other.clone()]}}),
    );
    let mut writer = StatusWriter::new(client);
    let bound = Status {
        kind: "Service",
        namespace: "shop".into(),
        name: "web".into(),
        accepted: false,
        reason: "WaypointNotFound",
        message: "metadata.labels[istio.io/use-waypoint]: no waypoint shop/waypiont".into(),
        condition: "istio.io/WaypointBound",
    };
    writer.write(&[(bound.clone(), Some(2))]).await;
    let sent = fake.patches(path);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let conditions = sent[0]["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 2, "{conditions:?}");
    assert_eq!(conditions[0], other, "another condition is kept");
    assert_eq!(conditions[1]["type"], "istio.io/WaypointBound");
    assert_eq!(conditions[1]["status"], "False");
    assert_eq!(conditions[1]["reason"], "WaypointNotFound");
    assert!(
        conditions[1]["message"]
            .as_str()
            .unwrap()
            .contains("waypiont")
    );

    writer.write(&[(bound, Some(2))]).await;
    assert_eq!(fake.patches(path).len(), 1, "unchanged: not written again");

    // The label goes: no status for the Service, so the condition goes.
    writer.write(&[]).await;
    let sent = fake.patches(path);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1]["status"]["conditions"], json!([other]));
    writer.write(&[]).await;
    assert_eq!(fake.patches(path).len(), 2, "and only once");
}

/// A ServiceEntry's status, as a Service's: a refusal is an `Accepted`
/// condition; once it is served and bound, that condition goes and
/// `istio.io/WaypointBound` takes its place; other conditions are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_entry_conditions() {
    use weft_controller::policy::Status;
    let (client, fake) = mock_client();
    let path = "/apis/networking.istio.io/v1/namespaces/shop/serviceentries/legacy/status";
    let other =
        json!({"type": "example.com/Ready", "status": "True", "reason": "Fine", "message": ""});
    fake.objects.lock().unwrap().insert(
        path.into(),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
               "metadata": meta("legacy", Some("shop"), "1"),
               "status": {"conditions": [other.clone()]}}),
    );
    let mut writer = StatusWriter::new(client);
    let refused = Status {
        kind: "ServiceEntry",
        namespace: "shop".into(),
        name: "legacy".into(),
        accepted: false,
        reason: "Invalid",
        message: "spec.resolution: DNS is not supported".into(),
        condition: "Accepted",
    };
    writer.write(&[(refused, Some(1))]).await;
    let sent = fake.patches(path);
    assert_eq!(sent.len(), 1, "{sent:?}");
    let conditions = sent[0]["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions[0], other);
    assert_eq!(conditions[1]["type"], "Accepted");
    assert_eq!(conditions[1]["status"], "False");
    assert_eq!(conditions[1]["observedGeneration"], 1);

    let bound = Status {
        kind: "ServiceEntry",
        namespace: "shop".into(),
        name: "legacy".into(),
        accepted: true,
        reason: "WaypointAccepted",
        message: "bound to waypoint shop/waypoint".into(),
        condition: "istio.io/WaypointBound",
    };
    writer.write(&[(bound.clone(), Some(2))]).await;
    let sent = fake.patches(path);
    assert_eq!(
        sent.len(),
        3,
        "the refusal removed, the binding written: {sent:?}"
    );
    assert_eq!(sent[1]["status"]["conditions"], json!([other]));
    let conditions = sent[2]["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions[1]["type"], "istio.io/WaypointBound");
    assert_eq!(conditions[1]["status"], "True");
    writer.write(&[(bound, Some(2))]).await;
    assert_eq!(fake.patches(path).len(), 3, "unchanged: not written again");
    writer.write(&[]).await;
    assert_eq!(fake.patches(path).len(), 4, "gone: its condition goes");
}

/// The mesh root reaches every namespace but Kubernetes' own, as Istio
/// publishes it; a deleted or altered copy is written again, a new
/// namespace gets one, and nothing is written twice without a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_root_published_to_every_namespace() {
    use std::collections::BTreeSet;
    use weft_controller::root_cert::{self, RootPublisher};

    let (client, fake) = mock_client();
    fake.list("/api/v1/configmaps", Vec::new());
    let cm_path = |ns: &str| format!("/api/v1/namespaces/{ns}/configmaps/istio-ca-root-cert");
    let applied = |ns: &str| fake.patches(&cm_path(ns)).len();
    let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let (tx, rx) = tokio::sync::watch::channel(set(&["default", "shop", "kube-system"]));
    // This replica leads (the sender lives as long as the test).
    let (_leads, leader) = tokio::sync::watch::channel(true);
    tokio::spawn(root_cert::run(
        RootPublisher::new(client, "ROOT PEM"),
        "weft-system".into(),
        rx,
        leader,
    ));
    let settle = || tokio::time::sleep(Duration::from_millis(300));
    // Everything starts at once: the first namespaces, then a watch event.
    for _ in 0..100 {
        if applied("default") > 0 && applied("weft-system") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    settle().await;
    for ns in ["default", "shop", "weft-system"] {
        let p = fake.patches(&cm_path(ns));
        assert_eq!(p.len(), 1, "{ns}: {p:?}");
        assert_eq!(p[0]["data"]["root-cert.pem"], "ROOT PEM");
        assert_eq!(p[0]["metadata"]["labels"]["istio.io/config"], "true");
    }
    assert_eq!(
        applied("kube-system"),
        0,
        "Kubernetes' own namespaces are skipped"
    );

    // Our own write echoed back changes nothing.
    let cm = |ns: &str, root: &str| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": meta("istio-ca-root-cert", Some(ns), "2"),
               "data": {"root-cert.pem": root}})
    };
    fake.event("/api/v1/configmaps", "ADDED", cm("shop", "ROOT PEM"))
        .await;
    settle().await;
    assert_eq!(applied("shop"), 1);
    // Deleted: written again. Altered: written again.
    fake.event("/api/v1/configmaps", "DELETED", cm("shop", "ROOT PEM"))
        .await;
    fake.event("/api/v1/configmaps", "MODIFIED", cm("default", "NOT OURS"))
        .await;
    for _ in 0..100 {
        if applied("shop") == 2 && applied("default") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((applied("shop"), applied("default")), (2, 2));
    // A new namespace gets it; the others are not written again.
    tx.send_replace(set(&["default", "shop", "kube-system", "payments"]));
    for _ in 0..100 {
        if applied("payments") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    settle().await;
    assert_eq!(applied("payments"), 1);
    assert_eq!(
        (applied("shop"), applied("default"), applied("weft-system")),
        (2, 2, 1)
    );
}

/// A Gateway's parametersRef ConfigMap overlays its waypoint's objects; one
/// that is missing or bad is named on the Gateway's status
/// (InvalidParameters) and what runs is left alone; fixed, it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_parameters_from_a_config_map() {
    use weft_controller::deploy::WaypointGateway;
    use weft_controller::waypoints::{Infrastructure, ParametersRef};
    let (client, fake) = mock_client();
    let mut deployer = deployer(client);
    let gw = WaypointGateway {
        namespace: "shop".into(),
        name: "waypoint".into(),
        uid: "uid-1".into(),
        infrastructure: Infrastructure {
            parameters_ref: Some(ParametersRef {
                group: String::new(),
                kind: "ConfigMap".into(),
                name: "wp-params".into(),
            }),
            ..Infrastructure::default()
        },
    };
    let dep_path = "/apis/apps/v1/namespaces/shop/deployments/waypoint";
    let status_path = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint/status";
    // Missing: refused, nothing deployed.
    deployer.apply(std::slice::from_ref(&gw)).await;
    assert!(fake.patches(dep_path).is_empty());
    let status = fake.patches(status_path);
    let accepted = &status.last().unwrap()["status"]["conditions"][0];
    assert_eq!(
        (accepted["status"].as_str(), accepted["reason"].as_str()),
        (Some("False"), Some("InvalidParameters"))
    );
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("spec.infrastructure.parametersRef: ConfigMap shop/wp-params does not exist"),
        "{accepted}"
    );
    // Present: its deployment patch is applied.
    fake.objects.lock().unwrap().insert(
        "/api/v1/namespaces/shop/configmaps/wp-params".into(),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "wp-params", "namespace": "shop"},
               "data": {"deployment": "spec:\n  replicas: 2\n"}}),
    );
    deployer.apply(std::slice::from_ref(&gw)).await;
    let dep = fake.patches(dep_path);
    assert_eq!(dep.len(), 1);
    assert_eq!(dep[0]["spec"]["replicas"], 2);
    let accepted = fake.patches(status_path).last().unwrap()["status"]["conditions"][0].clone();
    assert_eq!(accepted["status"], "True");
    // Broken: refused on the status, the running Deployment left as it was.
    fake.objects.lock().unwrap().insert(
        "/api/v1/namespaces/shop/configmaps/wp-params".into(),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "wp-params", "namespace": "shop"},
               "data": {"deploymnet": "spec: {replicas: 5}"}}),
    );
    deployer.apply(std::slice::from_ref(&gw)).await;
    assert_eq!(fake.patches(dep_path).len(), 1, "what runs is left alone");
    let accepted = fake.patches(status_path).last().unwrap()["status"]["conditions"][0].clone();
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("key \"deploymnet\""),
        "{accepted}"
    );
}

/// Two replicas: one leads (writes to the cluster), the other waits. A
/// leader that crashes is replaced once its lease runs out, never before;
/// one that stops gives the lease up and the other takes over at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_leads_and_hands_over() {
    use tokio::sync::watch;
    use weft_controller::lease::{self, Timing};
    let (client, fake) = mock_client();
    let timing = Timing {
        duration: Duration::from_secs(2),
        renew: Duration::from_millis(100),
    };
    let lease_path = "/apis/coordination.k8s.io/v1/namespaces/weft-system/leases/weft-controller";
    let holder = |f: &Fake| {
        f.objects.lock().unwrap().get(lease_path).map(|l| {
            (
                l["spec"]["holderIdentity"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                l["spec"]["leaseTransitions"].as_i64().unwrap_or_default(),
            )
        })
    };
    async fn until(what: &str, rx: &watch::Receiver<bool>, within: Duration) {
        let started = std::time::Instant::now();
        while !*rx.borrow() {
            assert!(started.elapsed() < within, "{what} not within {within:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // a leads, on a runtime of its own that will die with it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (stop_a, rx) = watch::channel(false);
    let a = {
        let _enter = rt.enter();
        lease::elect(client.clone(), "weft-system", "a", timing, rx)
    };
    until("a leads", &a, Duration::from_secs(2)).await;
    let (stop_b, rx) = watch::channel(false);
    let b = lease::elect(client.clone(), "weft-system", "b", timing, rx);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!*b.borrow(), "b took the lease a renews");
    assert_eq!(holder(&fake), Some(("a".to_string(), 0)));

    // a crashes: no renewal, no release. b waits the lease out, then leads.
    rt.shutdown_background();
    drop(stop_a);
    let stamp = |f: &Fake, field: &str| {
        let lease = f.objects.lock().unwrap().get(lease_path).cloned().unwrap();
        let at: k8s_openapi::jiff::Timestamp =
            lease["spec"][field].as_str().unwrap().parse().unwrap();
        at
    };
    // A renewal a had in flight lands within a moment, if at all.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let renewed = stamp(&fake, "renewTime");
    tokio::time::sleep(timing.duration / 3).await;
    assert!(!*b.borrow(), "b led before a's lease ran out");
    until("b leads", &b, timing.duration * 3).await;
    assert_eq!(holder(&fake), Some(("b".to_string(), 1)));
    // Measured on the lease's own clock: b took it no sooner than a's last
    // renewal plus the lease's duration.
    let waited = stamp(&fake, "acquireTime").duration_since(renewed);
    assert!(
        waited.as_secs_f64() >= timing.duration.as_secs_f64(),
        "b took over {waited:?} after a's last renewal"
    );

    // c waits while b renews; b stops and gives the lease up: c leads at once.
    let (_stop_c, rx) = watch::channel(false);
    let c = lease::elect(client.clone(), "weft-system", "c", timing, rx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!*c.borrow());
    let stopped = std::time::Instant::now();
    stop_b.send_replace(true);
    until("c leads", &c, timing.duration).await;
    assert!(stopped.elapsed() < timing.duration);
    assert!(!*b.borrow());
    assert_eq!(holder(&fake), Some(("c".to_string(), 2)));
}

/// A leader whose API server stops answering stops leading when its lease
/// runs out, as another replica may take the lease then: a round that
/// hangs does not keep the lead, and two replicas never write at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_stops_leading() {
    use std::sync::atomic::Ordering;
    use weft_controller::lease::{self, Timing};
    let (client, fake) = mock_client();
    let timing = Timing {
        duration: Duration::from_secs(2),
        renew: Duration::from_millis(100),
    };
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let a = lease::elect(client, "weft-system", "a", timing, rx);
    let started = std::time::Instant::now();
    while !*a.borrow() {
        assert!(started.elapsed() < Duration::from_secs(5), "a never led");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.hang.store(true, Ordering::Release);
    let cut = std::time::Instant::now();
    while *a.borrow() {
        assert!(
            cut.elapsed() < timing.duration * 3,
            "a still leads {:?} after the API server stopped answering",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
