//! End-to-end: a waypoint declared by Istio's Gateway manifest, bound with
//! `istio.io/use-waypoint`, routing real HTTP/1.1 over HBONE through
//! ztunnels on two nodes by Istio's VirtualService and DestinationRule YAML;
//! an unknown waypoint fails closed; a bad route keeps the last good one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Result, ensure};
use weft_tests::apps::{self, App};
use weft_tests::bookinfo::{MESH, REVIEWS, WAYPOINT_POD, get, served_by};
use weft_tests::check::{eventually, metric_sum};
use weft_tests::{Lab, LabOptions};

/// A service bound to a misspelt waypoint.
const RATINGS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo, labels: {istio.io/use-waypoint: waypiont}}
spec: {clusterIP: 10.96.0.21, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
"#;

/// Istio's documented reviews routing: jason to v2, the rest 90/10 v1/v2;
/// `/api/` rewritten to `/v2/`; a 5 s timeout.
const ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /v2/}
    route: [{destination: {host: reviews, subset: v1}}]
    headers: {response: {set: {x-routed-by: weft}}}
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
    timeout: 5s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

#[test]
fn virtual_service_routes_through_the_waypoint() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("waypoint-routes", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Http)?;
    let waypoint_ip = lab.pod(WAYPOINT_POD).ip;

    // Bound, no routes yet: through the waypoint to either version. The app
    // sees the waypoint as its peer and the client in X-Forwarded-For.
    let r = get(&lab, "/", &[])?;
    ensure!(r.status == 200, "{r:?}\n{}", lab.waypoint_log(WAYPOINT_POD));
    ensure!(
        r.body.contains(&format!("you are {waypoint_ip}")),
        "the destination sees the waypoint: {}",
        r.body
    );
    ensure!(
        r.body.contains("x-forwarded-for: 10.244.1.10"),
        "the client travels in X-Forwarded-For: {}",
        r.body
    );

    // Istio's VirtualService and DestinationRule, unchanged.
    lab.write_manifest("routes.yaml", ROUTES)?;
    eventually(
        "the routes reach the waypoint",
        Duration::from_secs(5),
        || {
            Ok(lab
                .waypoint_log(WAYPOINT_POD)
                .contains("route table applied"))
        },
    )
    .map_err(|e| e.context(lab.waypoint_log(WAYPOINT_POD)))?;
    // Routes and subsets arrive as two resources: wait for both.
    eventually("jason routed to v2", Duration::from_secs(5), || {
        Ok(get(&lab, "/", &[("end-user", "jason")])
            .is_ok_and(|r| r.status == 200 && served_by(&r) == "reviews-v2"))
    })?;
    for _ in 0..200 {
        let r = get(&lab, "/", &[("end-user", "jason")])?;
        ensure!(
            served_by(&r) == "reviews-v2",
            "jason always gets v2: {r:?}\n{}",
            lab.waypoint_log(WAYPOINT_POD)
        );
    }
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..200 {
        let r = get(&lab, "/", &[])?;
        ensure!(r.status == 200, "{r:?}");
        *counts.entry(served_by(&r).to_string()).or_default() += 1;
    }
    let v1 = counts.get("reviews-v1").copied().unwrap_or(0);
    let v2 = counts.get("reviews-v2").copied().unwrap_or(0);
    eprintln!("200 requests without end-user: {counts:?}");
    ensure!(v1 + v2 == 200, "{counts:?}");
    ensure!((160..=195).contains(&v1), "90/10 split, got {counts:?}");

    // Rewrite and a response header.
    let r = get(&lab, "/api/items?x=1", &[])?;
    ensure!(served_by(&r) == "reviews-v1", "{r:?}");
    ensure!(
        r.body.contains("path /v2/items?x=1"),
        "prefix rewritten: {}",
        r.body
    );
    ensure!(r.header("x-routed-by") == Some("weft"), "{r:?}");

    // Istio's request metrics, reported by the waypoint.
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    let served = metric_sum(
        &text,
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("response_code", "200"),
            ("destination_service", "reviews.bookinfo.svc.cluster.local"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage",
            ),
        ],
    );
    ensure!(served >= 222.0, "requests counted: {served}\n{text}");
    let v2_requests = metric_sum(
        &text,
        "istio_requests_total",
        &[
            ("destination_workload", "reviews-v2"),
            ("destination_canonical_revision", "v2"),
        ],
    );
    ensure!(
        v2_requests >= 20.0 + f64::from(v2),
        "per destination: {v2_requests}"
    );
    ensure!(
        text.contains("istio_request_duration_milliseconds_bucket{"),
        "histogram"
    );

    // A bad edit (an unclosed regex) is refused; the last good routes stay.
    lab.write_manifest(
        "routes.yaml",
        &ROUTES.replace("{exact: jason}", "{regex: \"(jason\"}"),
    )?;
    eventually("the refusal is reported", Duration::from_secs(5), || {
        Ok(lab
            .controller_log()
            .contains("spec.http[0].match[0].headers[end-user].regex"))
    })?;
    for _ in 0..10 {
        let r = get(&lab, "/", &[("end-user", "jason")])?;
        ensure!(
            served_by(&r) == "reviews-v2",
            "the last good route keeps serving: {r:?}"
        );
    }
    lab.teardown()
}

#[test]
fn unknown_waypoint_fails_closed() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("waypoint-unknown", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Http)?;
    lab.write_manifest("ratings.yaml", RATINGS)?;
    let client = lab.pod("bookinfo/productpage");
    eventually("ratings is known", Duration::from_secs(5), || {
        Ok(lab
            .controller_log()
            .contains("no waypoint bookinfo/waypiont"))
    })?;
    // `ratings` asks for a misspelt waypoint: refused, never sent direct.
    let dst: SocketAddr = "10.96.0.21:9080".parse()?;
    eventually(
        "refused as waypoint_unavailable",
        Duration::from_secs(5),
        || {
            let _ = apps::http(client, dst, "GET", "/", &[]);
            let metrics = lab.metrics("node-1")?;
            let refused = metric_sum(
                &metrics,
                "weft_connections_refused_total",
                &[("reason", "waypoint_unavailable")],
            );
            Ok(refused >= 1.0)
        },
    )?;
    for _ in 0..5 {
        let got = apps::http(client, dst, "GET", "/", &[]);
        ensure!(
            got.is_err(),
            "a binding to an unknown waypoint must not reach the app: {got:?}"
        );
    }
    let reached = |s: &apps::Server| s.accepted.load(std::sync::atomic::Ordering::Relaxed);
    ensure!(
        reached(&_v1) + reached(&_v2) == 0,
        "no connection reached an app behind the unknown waypoint"
    );
    ensure!(
        lab.controller_log()
            .contains("no waypoint bookinfo/waypiont"),
        "the controller says why"
    );
    // The correctly bound service still works.
    ensure!(get(&lab, "/", &[])?.status == 200);
    lab.teardown()
}

/// Istio's L7 AuthorizationPolicy attached to the waypoint: DELETE denied
/// with Envoy's 403, other methods pass; an ALLOW naming another identity
/// leaves this client out; the refusal of a rule it cannot evaluate.
#[test]
fn l7_authorization_policy() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("waypoint-authz", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Http)?;
    let _w1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9090, App::WhoAmI)?;
    let _w2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9090, App::WhoAmI)?;
    let client = lab.pod("bookinfo/productpage");
    let dst: SocketAddr = REVIEWS.parse()?;
    let tcp: SocketAddr = "10.96.0.25:9090".parse()?;
    ensure!(
        apps::http(client, dst, "DELETE", "/", &[])?.status == 200,
        "no policy yet"
    );
    let seen = apps::whoami(client, tcp)?;
    ensure!(
        seen.ip().to_string() == "10.244.1.20",
        "a tcp- port goes through the waypoint at L4: the app sees it, not {seen}"
    );
    // Policy, routes and app all see the normalized path (Istio's BASE).
    let r = apps::http(client, dst, "GET", "/public/%2e%2e/%61dmin/./x", &[])?;
    ensure!(
        r.body.contains("path /admin/x\n"),
        "normalized upstream: {r:?}"
    );

    lab.write_manifest(
        "authz.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-delete, namespace: bookinfo}
spec:
  targetRefs:
  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
  action: DENY
  rules:
  - to: [{operation: {methods: [DELETE]}}]
  - to: [{operation: {paths: [/admin*]}}]
  - from: [{source: {remoteIpBlocks: [10.244.1.10/32]}}]
    to: [{operation: {paths: [/spoof]}}]
"#,
    )?;
    eventually("DELETE denied", Duration::from_secs(5), || {
        Ok(apps::http(client, dst, "DELETE", "/", &[])?.status == 403)
    })?;
    let r = apps::http(client, dst, "DELETE", "/", &[])?;
    ensure!(r.body == "RBAC: access denied", "Envoy's body: {r:?}");
    ensure!(
        apps::http(client, dst, "GET", "/", &[])?.status == 200,
        "GET passes"
    );
    for path in [
        "/admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/%61dmin",
        "/./admin/x",
    ] {
        let r = apps::http(client, dst, "GET", path, &[])?;
        ensure!(
            r.status == 403,
            "{path} is /admin after normalization: {r:?}"
        );
    }
    // remote.ip is the peer: a client cannot name another address in
    // X-Forwarded-For to get past a remoteIpBlocks rule.
    let r = apps::http(
        client,
        dst,
        "GET",
        "/spoof",
        &[("x-forwarded-for", "192.0.2.1")],
    )?;
    ensure!(r.status == 403, "X-Forwarded-For is not trusted: {r:?}");
    // At L4, as in Istio, a DENY's HTTP-only fields are dropped: every rule
    // above matches a TCP connection, so it is denied, never let through.
    ensure!(
        apps::whoami(client, tcp).is_err(),
        "a TCP connection past an HTTP DENY"
    );
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    let denied = metric_sum(
        &text,
        "istio_requests_total",
        &[("response_code", "403"), ("reporter", "waypoint")],
    );
    ensure!(denied >= 8.0, "denials counted: {denied}");
    let l4 = |outcome| {
        metric_sum(
            &text,
            "weft_waypoint_l4_connections_total",
            &[("outcome", outcome)],
        )
    };
    ensure!(
        l4("denied") >= 1.0 && l4("forwarded") >= 1.0,
        "L4 outcomes counted: {text}"
    );

    // An ALLOW for its own service account: allowed; for another: denied.
    let allow = |sa: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only, namespace: bookinfo}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: \"\", name: reviews}}]\n  action: ALLOW\n\
             \x20 rules: [{{from: [{{source: {{principals: [cluster.local/ns/bookinfo/sa/{sa}]}}}}]}}]\n"
        )
    };
    lab.write_manifest("allow.yaml", &allow("bookinfo-productpage"))?;
    lab.write_manifest("authz.yaml", "")?;
    eventually(
        "allowed for its own principal, DELETE no longer denied",
        Duration::from_secs(5),
        || Ok(apps::http(client, dst, "DELETE", "/", &[])?.status == 200),
    )?;
    lab.write_manifest("allow.yaml", &allow("bookinfo-ratings"))?;
    eventually(
        "GET denied for another principal",
        Duration::from_secs(5),
        || Ok(apps::http(client, dst, "GET", "/", &[])?.status == 403),
    )?;

    // A JWT rule cannot be evaluated: refused, and the last accepted
    // version (which denies this client) stays in force; dropping it or
    // widening it would let the GET through.
    lab.write_manifest(
        "allow.yaml",
        &allow("bookinfo-productpage").replace("principals:", "requestPrincipals:"),
    )?;
    eventually("the refusal is reported", Duration::from_secs(5), || {
        Ok(lab
            .controller_log()
            .contains("requestPrincipals: JWT is not supported"))
    })?;
    for _ in 0..10 {
        let r = apps::http(client, dst, "GET", "/", &[])?;
        ensure!(r.status == 403, "the last accepted ALLOW stays: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.teardown()
}

/// Gateway API's HTTPRoute with the Service as parent (GAMMA): a prefix
/// rewrite with a request header, and weighted backendRefs.
#[test]
fn http_route_through_the_waypoint() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("waypoint-httproute", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Http)?;
    lab.write_manifest(
        "httproute.yaml",
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-env, value: canary}]}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - backendRefs:
    - {name: reviews-v1, port: 9080, weight: 0}
    - {name: reviews-v2, port: 9080, weight: 1}
"#,
    )?;
    eventually("the HTTPRoute is in force", Duration::from_secs(5), || {
        Ok(get(&lab, "/api/items", &[]).is_ok_and(|r| r.body.contains("path /v2/items")))
    })?;
    let r = get(&lab, "/api/items", &[])?;
    ensure!(served_by(&r) == "reviews-v1", "{r:?}");
    ensure!(
        r.body.contains("x-env: canary"),
        "request header added: {}",
        r.body
    );
    ensure!(
        get(&lab, "/apix", &[])?.body.contains("reviews-v2"),
        "PathPrefix is by segment"
    );
    for _ in 0..20 {
        let r = get(&lab, "/", &[])?;
        ensure!(
            served_by(&r) == "reviews-v2",
            "weight 0 takes nothing: {r:?}"
        );
    }
    lab.teardown()
}

/// HTTP/2 and gRPC through the waypoint (sniffed from the preface): a
/// streamed request body echoed back, trailers intact; and a WebSocket
/// upgrade, whose bytes then flow both ways.
#[test]
fn h2_grpc_and_websocket_through_the_waypoint() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("waypoint-h2", MESH))?;
    let _h2 = apps::serve_h2(lab.pod("bookinfo/reviews-v1"), 9080)?;
    let _h2b = apps::serve_h2(lab.pod("bookinfo/reviews-v2"), 9080)?;
    let client = lab.pod("bookinfo/productpage");
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    // A `grpc` port: HTTP/2 to the pod, as Istio.
    let r = apps::h2_post(
        client,
        "10.96.0.26:9080".parse()?,
        "/echo.Echo/Stream",
        body.clone(),
        64,
    )?;
    ensure!(r.status == 200, "{}", lab.waypoint_log(WAYPOINT_POD));
    let head = b"hello from reviews-v1 over HTTP/2, path /echo.Echo/Stream\n";
    ensure!(
        r.body.starts_with(head),
        "{:?}",
        String::from_utf8_lossy(&r.body[..80.min(r.body.len())])
    );
    ensure!(
        r.body[head.len()..] == body[..],
        "the 1 MB stream comes back intact"
    );
    ensure!(
        r.trailers.get("grpc-status").is_some_and(|v| v == "0"),
        "trailers: {:?}",
        r.trailers
    );
    ensure!(
        r.trailers
            .get("x-echoed-bytes")
            .is_some_and(|v| v == "1000000"),
        "trailers: {:?}",
        r.trailers
    );
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    ensure!(
        metric_sum(
            &text,
            "istio_requests_total",
            &[
                ("destination_service_name", "reviews-grpc"),
                ("response_code", "200"),
                ("request_protocol", "grpc"),
                ("grpc_response_status", "0"),
            ]
        ) >= 1.0,
        "counted as gRPC, with the status from the trailers:\n{text}"
    );
    // The response's size is the whole stream's (counted as it ends).
    ensure!(
        metric_sum(
            &text,
            "istio_response_bytes_sum",
            &[("destination_service_name", "reviews-grpc")]
        ) >= 1_000_000.0,
        "response bytes:\n{text}"
    );
    drop(_h2);
    drop(_h2b);

    // An `http` port is HTTP/1.1 to the pod whatever the client speaks, as
    // Istio: an h2 client reaches an HTTP/1.1-only app. (The h2 server lets
    // go of its port on its own thread, so the bind may have to wait.)
    let mut _v1 = None;
    eventually("port 9080 is free again", Duration::from_secs(5), || {
        _v1 = Some(apps::serve(
            lab.pod("bookinfo/reviews-v1"),
            9080,
            App::Http,
        )?);
        Ok(true)
    })?;
    let r = apps::h2_post(
        client,
        "10.96.0.22:9080".parse()?,
        "/h1",
        b"ping".to_vec(),
        2,
    )?;
    ensure!(r.status == 200, "{}", lab.waypoint_log(WAYPOINT_POD));
    let text = String::from_utf8_lossy(&r.body);
    ensure!(
        text.starts_with("hello from reviews-v1, you are ") && text.contains("path /h1\n"),
        "{text:?}"
    );
    ensure!(
        text.contains("host: 10.96.0.22:9080"),
        "the h2 authority is the HTTP/1.1 Host: {text:?}"
    );

    let _ws = apps::serve(lab.pod("bookinfo/reviews-v2"), 9081, App::Upgrade)?;
    lab.write_manifest(
        "ws.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: chat, namespace: bookinfo}\n\
         spec: {clusterIP: 10.96.0.24, selector: {app: reviews, version: v2}, ports: [{name: http-ws, port: 9081}]}\n",
    )?;
    eventually("the chat service is known", Duration::from_secs(5), || {
        Ok(apps::upgrade_echo(client, "10.96.0.24:9081".parse()?, b"ping").is_ok())
    })?;
    let (status, echoed) = apps::upgrade_echo(
        client,
        "10.96.0.24:9081".parse()?,
        b"frames after the upgrade",
    )?;
    ensure!(status.starts_with("HTTP/1.1 101"), "{status}");
    ensure!(echoed == b"frames after the upgrade", "{echoed:?}");
    lab.teardown()
}

/// Local answers and errors as Envoy gives them: a redirect, a direct
/// response, 504 after the route's timeout, 503 when the backend refuses
/// the connection, 404 when no rule matches, 400 for a malformed request.
#[test]
fn local_replies_and_errors() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("waypoint-errors", MESH))?;
    let _slow = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::SlowHttp(3000))?;
    // reviews-v2 serves nothing: connections to it are refused.
    lab.write_manifest(
        "routes.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{uri: {exact: /old}}]
    redirect: {uri: /new, authority: reviews.example}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - match: [{uri: {prefix: /slow}}]
    route: [{destination: {host: reviews, subset: v1}}]
    timeout: 0.5s
  - match: [{uri: {prefix: /down}}]
    route: [{destination: {host: reviews, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#,
    )?;
    eventually("the routes are in force", Duration::from_secs(5), || {
        Ok(get(&lab, "/teapot", &[]).is_ok_and(|r| r.status == 418))
    })?;
    let r = get(&lab, "/teapot", &[])?;
    ensure!(r.body == "short and stout", "{r:?}");
    let r = get(&lab, "/old", &[])?;
    ensure!(r.status == 301, "{r:?}");
    ensure!(
        r.header("location") == Some("http://reviews.example/new"),
        "{r:?}"
    );
    let started = std::time::Instant::now();
    let r = get(&lab, "/slow", &[])?;
    ensure!(
        r.status == 504 && r.body == "upstream request timeout",
        "{r:?}"
    );
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "timed out at 0.5 s: {:?}",
        started.elapsed()
    );
    let r = get(&lab, "/down", &[])?;
    ensure!(r.status == 503, "{r:?}");
    ensure!(r.body.starts_with("upstream connect error"), "{r:?}");
    let r = get(&lab, "/nowhere", &[])?;
    ensure!(r.status == 404, "no rule matches: {r:?}");
    // Malformed: a request line hyper cannot parse.
    let client = lab.pod("bookinfo/productpage");
    let raw = apps::client(client, REVIEWS.parse()?, |mut conn| {
        use std::io::{Read, Write};
        conn.write_all(b"GET /\x01bad HTTP/1.1\r\nhost: x\r\n\r\n")?;
        let mut out = String::new();
        let _ = conn.read_to_string(&mut out);
        Ok(out)
    })?;
    ensure!(raw.starts_with("HTTP/1.1 400"), "malformed: {raw:?}");
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    for (code, flag) in [("504", "UT"), ("503", "UF,URX"), ("404", "NR")] {
        ensure!(
            metric_sum(
                &text,
                "istio_requests_total",
                &[("response_code", code), ("response_flags", flag)]
            ) >= 1.0,
            "{code} {flag} counted:\n{text}"
        );
    }
    lab.teardown()
}

/// A workload waypoint (`istio.io/waypoint-for: workload`) bound to one pod
/// by its label: traffic addressed to the pod's own IP goes through it, the
/// app sees the waypoint as its peer, and the waypoint's policy applies.
#[test]
fn workload_waypoint_for_a_pod() -> Result<()> {
    let mesh = MESH.replace(
        "metadata: {name: reviews-v2, namespace: bookinfo, labels: {app: reviews, version: v2}}",
        "metadata: {name: reviews-v2, namespace: bookinfo, labels: {app: reviews, version: v2, istio.io/use-waypoint: pod-waypoint}}",
    );
    ensure!(mesh != MESH, "the pod is labelled");
    let mesh = format!(
        "{mesh}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: pod-waypoint, namespace: bookinfo, labels: {{istio.io/waypoint-for: workload}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"
    );
    let mut lab = Lab::up(LabOptions::new("waypoint-pod", &mesh))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Http)?;
    let client = lab.pod("bookinfo/productpage");
    let waypoint_ip = lab.pod("bookinfo/pod-waypoint-0").ip;
    let pod: SocketAddr = "10.244.2.11:9080".parse()?;
    let r = apps::http(client, pod, "GET", "/", &[])?;
    ensure!(r.status == 200, "{r:?}");
    ensure!(
        r.body
            .starts_with(&format!("hello from reviews-v2, you are {waypoint_ip}\n")),
        "the pod's own address goes through its waypoint: {r:?}"
    );
    ensure!(
        r.body.contains("x-forwarded-for: 10.244.1.10"),
        "the client travels in X-Forwarded-For: {r:?}"
    );
    // The other pod has no workload waypoint: direct, the client is the peer.
    let r = apps::http(client, "10.244.2.10:9080".parse()?, "GET", "/", &[])?;
    ensure!(r.body.contains("you are 10.244.1.10\n"), "{r:?}");

    lab.write_manifest(
        "authz.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-delete, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: pod-waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
"#,
    )?;
    eventually("DELETE to the pod denied", Duration::from_secs(5), || {
        Ok(apps::http(client, pod, "DELETE", "/", &[])?.status == 403)
    })?;
    ensure!(apps::http(client, pod, "GET", "/", &[])?.status == 200);
    let text = lab.waypoint_metrics("bookinfo/pod-waypoint-0")?;
    let served = metric_sum(
        &text,
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("destination_workload", "reviews-v2"),
        ],
    );
    ensure!(served >= 3.0, "counted by the pod's waypoint: {served}");

    // A new DENY the waypoint cannot read (JWT), with no accepted version to
    // keep, is enforced closed: it denies every request rather than none.
    lab.write_manifest(
        "jwt.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-bots, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: pod-waypoint}]
  action: DENY
  rules: [{from: [{source: {requestPrincipals: ["bots/*"]}}]}]
"#,
    )?;
    eventually(
        "an unreadable DENY denies GET too",
        Duration::from_secs(5),
        || Ok(apps::http(client, pod, "GET", "/", &[])?.status == 403),
    )?;
    ensure!(
        lab.controller_log()
            .contains("enforced closed as a DENY of every request"),
        "the status says so"
    );
    lab.teardown()
}

/// A ServiceEntry for a server outside the mesh (a pod of a namespace that
/// is not ambient), bound to the namespace's waypoint: routed by a
/// VirtualService on its host, which is literal (`legacy.example`, as in
/// Istio, is no Service), and guarded by an AuthorizationPolicy that
/// targets the ServiceEntry. A refused ServiceEntry says why.
#[test]
fn service_entry_through_the_waypoint() -> Result<()> {
    let outside = r#"
---
apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy-0, namespace: outside, labels: {app: legacy}}
spec: {nodeName: node-2, containers: [{name: app}]}
status: {podIP: 10.244.2.30}
"#;
    let mut lab = Lab::up(LabOptions::new(
        "waypoint-serviceentry",
        &format!("{MESH}{outside}"),
    ))?;
    let _legacy = apps::serve(lab.pod("outside/legacy-0"), 9080, App::Http)?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    lab.write_manifest(
        "entry.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: bookinfo}
spec:
  hosts: [legacy.example]
  addresses: [10.96.5.1]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 9080}]
  endpoints: [{address: 10.244.2.30}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: legacy, namespace: bookinfo}
spec:
  hosts: [legacy.example]
  http:
  - headers: {response: {set: {x-routed-by: weft}}}
    route: [{destination: {host: legacy.example}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: legacy-no-delete, namespace: bookinfo}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: legacy}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: hijack, namespace: bookinfo}
spec:
  hosts: [hijack.example]
  addresses: [10.96.0.20]
  resolution: STATIC
  ports: [{number: 9080, name: http}]
  endpoints: [{address: 10.244.2.30}]
"#,
    )?;
    let client = lab.pod("bookinfo/productpage");
    let dst: SocketAddr = "10.96.5.1:80".parse()?;
    eventually("the ServiceEntry is served", Duration::from_secs(5), || {
        let r = apps::http(client, dst, "GET", "/x", &[])?;
        ensure!(r.status == 200, "{r:?}");
        Ok(true)
    })?;
    let r = apps::http(client, dst, "GET", "/x", &[])?;
    ensure!(served_by(&r) == "legacy-0", "{r:?}");
    ensure!(r.body.contains("path /x\n"), "{r:?}");
    ensure!(
        r.header("x-routed-by") == Some("weft"),
        "routed by the VirtualService on its host: {r:?}"
    );
    let r = apps::http(client, dst, "DELETE", "/x", &[])?;
    ensure!(
        r.status == 403 && r.body == "RBAC: access denied",
        "the policy on the ServiceEntry: {r:?}"
    );
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    let count = |code| {
        metric_sum(
            &text,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("destination_service", "legacy.example"),
                ("response_code", code),
            ],
        )
    };
    ensure!(
        count("200") >= 2.0 && count("403") >= 1.0,
        "counted under its host: {text}"
    );
    // The other entry would take reviews' VIP: refused, and reviews still
    // answers from its own pods.
    ensure!(
        lab.controller_log().contains(
            "spec.addresses[0]: 10.96.0.20 is already the VIP of Service bookinfo/reviews"
        ),
        "the refusal names the field and the holder"
    );
    let r = get(&lab, "/", &[])?;
    ensure!(served_by(&r).starts_with("reviews-"), "{r:?}");
    lab.teardown()
}

/// VirtualService corsPolicy: a preflight from an allowed origin is
/// answered at the waypoint and never reaches the pods; a request from it
/// gets the allow headers on the pod's answer; a preflight from any other
/// origin goes to the pods, untouched.
#[test]
fn cors_preflight_at_the_waypoint() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("cors", MESH))?;
    let v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Http)?;
    lab.write_manifest(
        "routes.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {x-fail: {exact: "yes"}}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: reviews}}]
    corsPolicy:
      allowOrigins: [{exact: "https://shop.example"}]
  - route: [{destination: {host: reviews}}]
    corsPolicy:
      allowOrigins: [{exact: "https://shop.example"}]
      allowMethods: [GET, POST]
      allowHeaders: [x-user]
      exposeHeaders: [x-trace]
      maxAge: 1h
      allowCredentials: true
"#,
    )?;
    let client = lab.pod("bookinfo/productpage");
    let dst: SocketAddr = REVIEWS.parse()?;
    let preflight = |origin: &str| {
        apps::http(
            client,
            dst,
            "OPTIONS",
            "/reviews/1",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
            ],
        )
    };
    let answers = || v1.answers().len() + v2.answers().len();
    eventually(
        "the CORS policy is in force",
        Duration::from_secs(10),
        || {
            Ok(preflight("https://shop.example")?
                .header("access-control-allow-origin")
                .is_some())
        },
    )?;
    let requests = |lab: &Lab| -> Result<f64> {
        let text = lab.waypoint_metrics(WAYPOINT_POD)?;
        Ok(metric_sum(
            &text,
            "istio_requests_total",
            &[("reporter", "waypoint"), ("response_code", "200")],
        ))
    };
    let counted = requests(&lab)?;
    let before = answers();
    let r = preflight("https://shop.example")?;
    ensure!(r.status == 200, "{r:?}");
    for (name, value) in [
        ("access-control-allow-origin", "https://shop.example"),
        ("access-control-allow-methods", "GET,POST"),
        ("access-control-allow-headers", "x-user"),
        ("access-control-max-age", "3600"),
        ("access-control-allow-credentials", "true"),
    ] {
        ensure!(r.header(name) == Some(value), "{name}: {r:?}");
    }
    ensure!(answers() == before, "the preflight reached a pod");

    let r = get(&lab, "/", &[("origin", "https://shop.example")])?;
    ensure!(
        r.body.starts_with("hello from reviews-")
            && r.header("access-control-allow-origin") == Some("https://shop.example")
            && r.header("access-control-expose-headers") == Some("x-trace")
            && r.header("access-control-allow-credentials") == Some("true")
            && r.header("access-control-allow-methods").is_none(),
        "{r:?}"
    );
    ensure!(answers() == before + 1);

    let r = preflight("https://evil.example")?;
    ensure!(
        r.body.contains("path /reviews/1")
            && r.headers
                .iter()
                .all(|(n, _)| !n.starts_with("access-control-")),
        "{r:?}"
    );
    ensure!(answers() == before + 2, "the other preflight went to a pod");
    let r = get(&lab, "/", &[])?;
    ensure!(r.header("access-control-allow-origin").is_none(), "{r:?}");
    // The waypoint's own answers carry the headers too (Envoy's CORS
    // filter sits before the fault filter and the router).
    let r = get(
        &lab,
        "/",
        &[("origin", "https://shop.example"), ("x-fail", "yes")],
    )?;
    ensure!(
        r.status == 503 && r.header("access-control-allow-origin") == Some("https://shop.example"),
        "an injected abort: {r:?}"
    );
    ensure!(
        requests(&lab)? - counted == 4.0,
        "istio_requests_total counts the four answered 200, preflight included"
    );
    lab.teardown()
}
