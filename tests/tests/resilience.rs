//! End-to-end: the waypoint's resilience layers with Istio's YAML, over
//! real HBONE through ztunnels on two nodes: retries (Istio's default
//! policy, a VirtualService's, the request body sent again whole, the
//! retry limit) and fault injection (delays, HTTP and gRPC aborts, each for
//! its share of requests, never retried).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use weft_tests::apps::{self, App};
use weft_tests::bookinfo::{MESH, REVIEWS, WAYPOINT_POD, get, served_by};
use weft_tests::check::{eventually, metric_sum, settled};
use weft_tests::{Lab, LabOptions};

/// Round robin over reviews' two pods, so a failing one is hit every other
/// request when nothing retries.
const ROUND_ROBIN: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

fn routes(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec:\n  hosts: [reviews]\n  http:\n{http}---{ROUND_ROBIN}"
    )
}

/// The waypoint's retries against reviews with this outcome.
fn retry_count(lab: &Lab, outcome: &str) -> Result<f64> {
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    Ok(metric_sum(
        &text,
        "weft_waypoint_upstream_retries_total",
        &[
            ("destination_service", "reviews.bookinfo.svc.cluster.local"),
            ("outcome", outcome),
        ],
    ))
}

/// Writes manifests `file` and waits until the waypoint has applied them:
/// until its log has one more `applied` line ("route table applied",
/// "destination policy applied").
fn write_applied(lab: &Lab, file: &str, text: &str, applied: &str) -> Result<()> {
    let count = || lab.waypoint_log(WAYPOINT_POD).matches(applied).count();
    let before = count();
    lab.write_manifest(file, text)?;
    eventually(
        &format!("{file} is applied"),
        Duration::from_secs(10),
        || Ok(count() > before),
    )
}

/// reviews-v2 answers 503 to everything; reviews-v1 serves.
#[test]
fn retries_send_a_failed_request_again() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("retries", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Status(503))?;
    let client = lab.pod("bookinfo/productpage").clone();
    let reviews: SocketAddr = REVIEWS.parse()?;

    // No VirtualService: Istio's default policy retries a 503 on another pod.
    eventually("reviews answers", Duration::from_secs(5), || {
        Ok(get(&lab, "/", &[]).is_ok_and(|r| r.status == 200))
    })?;
    for i in 0..30 {
        let r = get(&lab, &format!("/default/{i}"), &[])?;
        ensure!(
            r.status == 200 && served_by(&r) == "reviews-v1",
            "request {i}, default policy: {r:?}"
        );
    }
    let by_default = retry_count(&lab, "retried")?;
    ensure!(by_default >= 1.0, "retries counted: {by_default}");

    // Retries off: every other request meets the failing pod.
    lab.write_manifest(
        "routes.yaml",
        &routes("  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 0}\n"),
    )?;
    eventually("retries off", Duration::from_secs(5), || {
        Ok((0..4).any(|_| get(&lab, "/", &[]).is_ok_and(|r| r.status == 503)))
    })?;
    let failed = (0..20)
        .filter(|_| get(&lab, "/", &[]).is_ok_and(|r| r.status == 503))
        .count();
    ensure!(
        (8..=12).contains(&failed),
        "round robin, no retries: half fail, got {failed} of 20"
    );

    // A VirtualService's policy; a 100 kB POST body goes again, whole.
    lab.write_manifest(
        "routes.yaml",
        &routes(
            "  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 2, perTryTimeout: 2s, retryOn: gateway-error}\n",
        ),
    )?;
    let body = "x".repeat(100_000);
    let post = || apps::http_with_body(&client, reviews, "POST", "/upload", &[], body.as_bytes());
    eventually("retries on", Duration::from_secs(5), || {
        Ok((0..4).all(|_| post().is_ok_and(|r| r.status == 200)))
    })?;
    let before = retry_count(&lab, "retried")?;
    for i in 0..10 {
        let r = post()?;
        ensure!(r.status == 200, "POST {i}: {r:?}");
        ensure!(
            r.body.contains("body 100000\n"),
            "the body arrived whole: {}",
            r.body
        );
    }
    ensure!(
        retry_count(&lab, "retried")? >= before + 4.0,
        "about every other POST was retried"
    );

    // Only the failing pod: retried twice, then its 503 is returned (URX).
    lab.write_manifest(
        "routes.yaml",
        &routes(
            "  - route: [{destination: {host: reviews, subset: v2}}]\n    retries: {attempts: 2, retryOn: 5xx}\n",
        ),
    )?;
    eventually("only v2", Duration::from_secs(5), || {
        Ok(get(&lab, "/", &[]).is_ok_and(|r| r.status == 503))
    })?;
    let before = retry_count(&lab, "retried")?;
    let r = get(&lab, "/", &[])?;
    ensure!(
        r.status == 503 && served_by(&r) == "reviews-v2",
        "the upstream's own 503: {r:?}"
    );
    ensure!(
        retry_count(&lab, "retried")? == before + 2.0,
        "two retries, then no more"
    );
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    ensure!(
        metric_sum(
            &text,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "URX")]
        ) >= 1.0,
        "the retry limit is flagged: {text}"
    );
    lab.teardown()
}

/// Istio's fault injection: each fault for its share of the matching
/// requests, only on its route, and never retried.
#[test]
fn fault_injection() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("faults", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Http)?;
    lab.write_manifest(
        "routes.yaml",
        &routes(
            r#"  - match: [{headers: {x-fault: {exact: abort}}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 30}}}
    retries: {attempts: 3, retryOn: 5xx}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{headers: {x-fault: {exact: delay}}}]
    fault: {delay: {fixedDelay: 300ms, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{headers: {x-fault: {exact: grpc}}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"#,
        ),
    )?;
    eventually("the faults are in force", Duration::from_secs(5), || {
        Ok(get(&lab, "/", &[("x-fault", "grpc")])
            .is_ok_and(|r| r.header("grpc-status") == Some("14")))
    })?;
    let r = get(&lab, "/", &[("x-fault", "grpc")])?;
    ensure!(
        r.status == 200 && r.header("grpc-message") == Some("fault filter abort"),
        "a trailers-only gRPC abort: {r:?}"
    );

    // 1,000 requests, 30% aborted: within ±5 points (over 3 standard
    // deviations), and an injected abort is never retried.
    let retries_before = retry_count(&lab, "retried")?;
    let mut aborted = 0;
    for i in 0..1000 {
        let r = get(&lab, "/", &[("x-fault", "abort")])?;
        match r.status {
            503 => {
                ensure!(r.body == "fault filter abort", "Envoy's body: {r:?}");
                aborted += 1;
            }
            200 => ensure!(served_by(&r) == "reviews-v1", "{r:?}"),
            _ => anyhow::bail!("request {i}: {r:?}"),
        }
    }
    ensure!(
        (250..=350).contains(&aborted),
        "30% aborted, within 5 points: {aborted} of 1000"
    );
    ensure!(
        retry_count(&lab, "retried")? == retries_before,
        "injected aborts are not retried"
    );

    for _ in 0..3 {
        let started = Instant::now();
        let r = get(&lab, "/", &[("x-fault", "delay")])?;
        ensure!(r.status == 200, "{r:?}");
        ensure!(
            started.elapsed() >= Duration::from_millis(300),
            "delayed 300 ms: {:?}",
            started.elapsed()
        );
    }
    // The other route is untouched.
    let started = Instant::now();
    ensure!(get(&lab, "/", &[])?.status == 200);
    ensure!(
        started.elapsed() < Duration::from_millis(300),
        "no delay without the header: {:?}",
        started.elapsed()
    );
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    let count = |code, flag| {
        metric_sum(
            &text,
            "istio_requests_total",
            &[("response_code", code), ("response_flags", flag)],
        )
    };
    ensure!(
        count("503", "FI") == f64::from(aborted) && count("200", "DI") >= 3.0,
        "faults flagged FI and DI:\n{text}"
    );
    lab.teardown()
}

/// Istio's circuit-breaking task: one connection, one request waiting for
/// it; the rest of a burst is refused at once with 503 `UO`, and the
/// served ones come back.
#[test]
fn circuit_breaking() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("breaker", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::SlowHttp(400))?;
    lab.write_manifest(
        "routes.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m}
  subsets:
  - {name: v1, labels: {version: v1}}
"#,
    )?;
    let client = lab.pod("bookinfo/productpage").clone();
    let reviews: SocketAddr = REVIEWS.parse()?;
    let burst = |n: usize| -> Vec<u16> {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let client = client.clone();
                std::thread::spawn(move || {
                    apps::http(&client, reviews, "GET", "/", &[]).map(|r| {
                        if r.status == 503 {
                            assert!(r.body.ends_with("reset reason: overflow"), "{r:?}");
                        }
                        r.status
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().ok().and_then(Result::ok).unwrap_or(0))
            .collect()
    };
    eventually("a burst overflows", Duration::from_secs(10), || {
        Ok(burst(6).contains(&503))
    })?;
    let statuses = burst(6);
    let (ok, overflow) = (
        statuses.iter().filter(|s| **s == 200).count(),
        statuses.iter().filter(|s| **s == 503).count(),
    );
    ensure!(
        ok >= 1 && overflow >= 1 && ok + overflow == 6,
        "one at a time served, one waiting, the rest refused: {statuses:?}"
    );
    ensure!(
        ok <= 3,
        "at most the connection, the queue and a freed turn: {statuses:?}"
    );
    // Once the burst is over, requests are served again.
    ensure!(get(&lab, "/", &[])?.status == 200);
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    ensure!(
        metric_sum(
            &text,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO")]
        ) >= overflow as f64,
        "overflows flagged UO:\n{text}"
    );
    lab.teardown()
}

/// Outlier detection: a pod that answers 503 twice in a row is ejected,
/// and the destination's requests go to the healthy one.
#[test]
fn outlier_detection_ejects_a_failing_pod() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("outliers", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Status(503))?;
    lab.write_manifest(
        "routes.yaml",
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    retries: {attempts: 0}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 50}
"#,
    )?;
    // Until the config is in, Istio's default retries hide the failing pod;
    // with it, round robin shows it until it is ejected.
    eventually("the routes are in force", Duration::from_secs(5), || {
        Ok((0..4).any(|_| get(&lab, "/", &[]).is_ok_and(|r| r.status == 503)))
    })?;
    let mut failed = 0;
    for _ in 0..10 {
        if get(&lab, "/", &[])?.status == 503 {
            failed += 1;
        }
    }
    ensure!(
        failed <= 2,
        "ejected after two 503s in a row: {failed} more"
    );
    for i in 0..20 {
        let r = get(&lab, "/", &[])?;
        ensure!(
            r.status == 200 && served_by(&r) == "reviews-v1",
            "request {i} after the ejection: {r:?}"
        );
    }
    ensure!(
        lab.waypoint_log(WAYPOINT_POD)
            .contains("endpoint ejected (outlier detection)"),
        "the ejection is logged"
    );
    // The admin view shows the ejected pod.
    let view = lab.waypoint_stats(WAYPOINT_POD, "/debug/outliers")?;
    let ejected: serde_json::Value = serde_json::from_str(&view)?;
    ensure!(
        ejected.as_array().is_some_and(|a| a.len() == 1
            && a[0]["endpoint"] == "10.244.2.11:9080"
            && a[0]["destination"] == "bookinfo/reviews.bookinfo.svc.cluster.local/"
            && a[0]["ejections"] == 1),
        "{view}"
    );
    lab.teardown()
}

fn hashed_by(key: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      consistentHash: {key}\n"
    )
}

/// Requests served by reviews-v1, as the waypoint counts them.
fn served_by_v1(lab: &Lab) -> Result<f64> {
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    Ok(metric_sum(
        &text,
        "istio_requests_total",
        &[
            ("reporter", "waypoint"),
            ("destination_workload", "reviews-v1"),
        ],
    ))
}

/// DestinationRule consistentHash: by a header, a generated cookie, the
/// client's address and a query parameter, each key stays on one pod while
/// different keys spread over both; the waypoint's metrics count each
/// request on the pod that served it.
#[test]
fn consistent_hash_keeps_a_key_on_one_pod() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("hash", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Http)?;

    // A header: each of 16 users' four requests reach one pod (by chance
    // about 1 in 8^16 without the hash), and the users use both pods.
    lab.write_manifest("dr.yaml", &hashed_by("{httpHeaderName: x-user}"))?;
    let pods_of_users = |lab: &Lab| -> Result<Option<Vec<String>>> {
        let mut pods = Vec::new();
        for u in 0..16 {
            let user = format!("user-{u}");
            let mut seen = Vec::new();
            for _ in 0..4 {
                let r = get(lab, "/", &[("x-user", &user)])?;
                ensure!(r.status == 200, "{r:?}");
                seen.push(served_by(&r).to_string());
            }
            seen.dedup();
            if seen.len() != 1 {
                return Ok(None);
            }
            pods.push(seen.remove(0));
        }
        Ok(Some(pods))
    };
    let mut pods = None;
    eventually(
        "the header hash is in force",
        Duration::from_secs(10),
        || {
            pods = pods_of_users(&lab)?;
            Ok(pods.is_some())
        },
    )?;
    let pods = pods.unwrap_or_default();
    ensure!(
        pods.iter().any(|p| p == "reviews-v1") && pods.iter().any(|p| p == "reviews-v2"),
        "16 users on one pod: {pods:?}"
    );
    // Again, later: the same users on the same pods.
    ensure!(
        pods_of_users(&lab)?.as_ref() == Some(&pods),
        "users moved between pods"
    );

    // A cookie with a ttl: set on the first answer as Envoy writes it, and
    // the requests that send it back stay on the pod that set it.
    lab.write_manifest(
        "dr.yaml",
        &hashed_by("{httpCookie: {name: session, path: /, ttl: 60s}}"),
    )?;
    let mut set = String::new();
    eventually(
        "the cookie hash is in force",
        Duration::from_secs(10),
        || {
            set = get(&lab, "/", &[])?
                .header("set-cookie")
                .unwrap_or_default()
                .to_string();
            Ok(!set.is_empty())
        },
    )?;
    ensure!(
        set.starts_with("session=\"") && set.ends_with("\"; Max-Age=60; Path=/; HttpOnly"),
        "Set-Cookie: {set}"
    );
    let mut cookie_pods = Vec::new();
    for _ in 0..16 {
        let first = get(&lab, "/", &[])?;
        let set = first.header("set-cookie").unwrap_or_default();
        let cookie = set.split(';').next().unwrap_or_default().to_string();
        let pod = served_by(&first).to_string();
        let before = served_by_v1(&lab)?;
        let mut v1 = 0;
        for _ in 0..5 {
            let r = get(&lab, "/", &[("cookie", &cookie)])?;
            ensure!(
                served_by(&r) == pod && r.header("set-cookie").is_none(),
                "{cookie} was set by {pod}: {r:?}"
            );
            if pod == "reviews-v1" {
                v1 += 1;
            }
        }
        let counted = served_by_v1(&lab)? - before;
        ensure!(
            counted == f64::from(v1),
            "istio_requests_total counts {counted} on reviews-v1, {v1} served"
        );
        cookie_pods.push(pod);
    }
    ensure!(
        cookie_pods.iter().any(|p| p == "reviews-v1")
            && cookie_pods.iter().any(|p| p == "reviews-v2"),
        "16 new cookies on one pod: {cookie_pods:?}"
    );

    // The client's address: productpage always reaches the same pod.
    lab.write_manifest(
        "dr.yaml",
        &hashed_by("{useSourceIp: true, maglev: {tableSize: 65537}}"),
    )?;
    eventually(
        "the cookie hash is no longer in force",
        Duration::from_secs(10),
        || Ok(get(&lab, "/", &[])?.header("set-cookie").is_none()),
    )?;
    let first = served_by(&get(&lab, "/", &[])?).to_string();
    for i in 0..20 {
        let r = get(&lab, "/", &[])?;
        ensure!(served_by(&r) == first, "request {i}: {r:?}, first {first}");
    }

    // A query parameter.
    lab.write_manifest("dr.yaml", &hashed_by("{httpQueryParameterName: u}"))?;
    let pods_of = |lab: &Lab| -> Result<Vec<String>> {
        let mut pods = Vec::new();
        for u in 0..16 {
            let mut seen: Vec<String> = (0..4)
                .map(|_| Ok(served_by(&get(lab, &format!("/?u=user-{u}"), &[])?).to_string()))
                .collect::<Result<_>>()?;
            seen.dedup();
            pods.push(seen.join("+"));
        }
        Ok(pods)
    };
    eventually(
        "the query hash is in force",
        Duration::from_secs(10),
        || {
            let pods = pods_of(&lab)?;
            Ok(pods.iter().all(|p| !p.contains('+'))
                && pods.iter().any(|p| p == "reviews-v1")
                && pods.iter().any(|p| p == "reviews-v2"))
        },
    )?;
    lab.teardown()
}

/// reviews routed to v1, mirrored to the reviews-v2 Service.
fn mirrored(extra: &str) -> String {
    routes(&format!(
        "  - route: [{{destination: {{host: reviews, subset: v1}}}}]\n    mirror: {{host: reviews-v2}}\n{extra}"
    ))
}

fn mirror_count(lab: &Lab, outcome: &str) -> Result<f64> {
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    Ok(metric_sum(
        &text,
        "weft_waypoint_mirror_requests_total",
        &[
            (
                "destination_service",
                "reviews-v2.bookinfo.svc.cluster.local",
            ),
            ("outcome", outcome),
        ],
    ))
}

/// VirtualService mirror: each request (or its share of them) is copied to
/// another service, body included and its host suffixed `-shadow`; the
/// client only ever sees the route's answer, and a mirror that hangs
/// neither delays nor fails it.
#[test]
fn mirroring_copies_requests_and_never_holds_them() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("mirror", MESH))?;
    let v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Http)?;
    let client = lab.pod("bookinfo/productpage");
    let dst: SocketAddr = REVIEWS.parse()?;
    lab.write_manifest("routes.yaml", &mirrored(""))?;
    eventually("the mirror is in force", Duration::from_secs(10), || {
        let r = get(&lab, "/", &[])?;
        Ok(served_by(&r) == "reviews-v1" && v2.answers().iter().any(|a| a.contains("-shadow")))
    })?;
    // A copy still on its way is not one of the 20 below: wait until the
    // copies received and counted hold still.
    let (before, counted) = settled(
        "earlier copies have landed",
        Duration::from_secs(10),
        || Ok((v2.answers().len(), mirror_count(&lab, "responded")?)),
    )?;
    let v2_requests = |lab: &Lab| -> Result<f64> {
        let text = lab.waypoint_metrics(WAYPOINT_POD)?;
        Ok(metric_sum(
            &text,
            "istio_requests_total",
            &[("destination_workload", "reviews-v2")],
        ))
    };
    let served = v1.answers().len();
    let v2_before = v2_requests(&lab)?;
    for i in 0..20 {
        let r = apps::http_with_body(client, dst, "POST", &format!("/m{i}"), &[], b"mirror-me")?;
        ensure!(
            r.status == 200 && served_by(&r) == "reviews-v1",
            "request {i}: {r:?}"
        );
    }
    eventually("20 copies reach reviews-v2", Duration::from_secs(5), || {
        Ok(v2.answers().len() >= before + 20)
    })?;
    let copies = v2.answers()[before..].to_vec();
    ensure!(copies.len() == 20, "{} copies", copies.len());
    // Copies go out on their own tasks: in any order.
    for i in 0..20 {
        let path = format!("path /m{i}\n");
        let c = copies
            .iter()
            .find(|c| c.contains(&path))
            .ok_or_else(|| anyhow::anyhow!("no copy of /m{i}: {copies:?}"))?;
        ensure!(
            c.contains("body 9\n") && c.contains("host: 10.96.0.20-shadow:9080"),
            "copy of /m{i}: {c}"
        );
    }
    ensure!(
        v1.answers().len() - served == 20,
        "the route served each once"
    );
    eventually(
        "the waypoint counts the copies",
        Duration::from_secs(5),
        || Ok(mirror_count(&lab, "responded")? - counted == 20.0),
    )?;
    // The copies are not requests of the client's.
    ensure!(
        v2_requests(&lab)? == v2_before,
        "mirrored requests counted as the client's"
    );

    // Half of the requests: 400 draw within 4 standard deviations of 200.
    write_applied(
        &lab,
        "routes.yaml",
        &mirrored("    mirrorPercentage: {value: 50}\n"),
        "route table applied",
    )?;
    // Copies of earlier requests still on their way are not counted below.
    let counted = settled(
        "earlier copies have landed",
        Duration::from_secs(10),
        || mirror_count(&lab, "responded"),
    )?;
    for _ in 0..400 {
        ensure!(get(&lab, "/", &[])?.status == 200);
    }
    let share = settled("the copies are counted", Duration::from_secs(10), || {
        mirror_count(&lab, "responded")
    })? - counted;
    ensure!(
        (160.0..=240.0).contains(&share),
        "{share} of 400 requests mirrored at 50%"
    );

    // A mirror that hangs: every client request is answered anyway, and
    // each copy ends at the route's timeout, counted.
    drop(v2);
    // The old server lets go of the port within its poll period.
    let mut hang = None;
    eventually("reviews-v2 serves, hanging", Duration::from_secs(2), || {
        hang = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::SlowHttp(60_000)).ok();
        Ok(hang.is_some())
    })?;
    lab.write_manifest("routes.yaml", &mirrored("    timeout: 2s\n"))?;
    eventually("the timeout is in force", Duration::from_secs(10), || {
        get(&lab, "/", &[])?;
        Ok(mirror_count(&lab, "timeout")? > 0.0)
    })?;
    let timed_out = mirror_count(&lab, "timeout")?;
    for i in 0..20 {
        let start = Instant::now();
        let r = get(&lab, "/", &[])?;
        ensure!(
            r.status == 200
                && served_by(&r) == "reviews-v1"
                && start.elapsed() < Duration::from_secs(1),
            "request {i} with a hanging mirror: {r:?} after {:?}",
            start.elapsed()
        );
    }
    eventually(
        "the hanging copies time out",
        Duration::from_secs(10),
        || Ok(mirror_count(&lab, "timeout")? - timed_out >= 20.0),
    )?;
    lab.teardown()
}

/// An OpenTelemetry collector outside the mesh.
const COLLECTOR: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: observability}
---
apiVersion: v1
kind: Pod
metadata: {name: otel-collector, namespace: observability, labels: {app: otel-collector}}
spec: {nodeName: node-1, containers: [{name: collector}]}
status: {podIP: 10.244.1.30}
---
apiVersion: v1
kind: Service
metadata: {name: otel-collector, namespace: observability}
spec: {clusterIP: 10.96.0.40, selector: {app: otel-collector}, ports: [{name: grpc-otlp, port: 4317}]}
"#;

/// The mesh config that names the collector, and a mesh-wide Telemetry that
/// traces every request.
const TRACING: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: otel
      opentelemetry: {service: otel-collector.observability.svc.cluster.local, port: 4317}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing:
  - providers: [{name: otel}]
    randomSamplingPercentage: 100
    customTags:
      team: {literal: {value: bookinfo}}
      user: {header: {name: x-user, defaultValue: anonymous}}
"#;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(attrs: &[weft_xds::otlp::KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|a| a.key == key).map(|a| a.text())
}

/// Telemetry tracing over OTLP: the waypoint continues the client's W3C
/// trace with a server span and one client span per attempt (a retry is a
/// second one), sends each attempt's context upstream, starts traces for
/// requests without one, and keeps a client's decision not to sample.
#[test]
fn tracing_spans_reach_an_otlp_collector() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("tracing", &format!("{MESH}---{COLLECTOR}")))?;
    let v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Status(503))?;
    let collector = weft_tests::otlp::serve(lab.pod("observability/otel-collector"), 4317)?;
    lab.write_manifest("telemetry.yaml", TRACING)?;
    lab.write_manifest(
        "routes.yaml",
        &routes("  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 2, retryOn: 5xx}\n"),
    )?;
    let traced = |trace: &str| {
        collector
            .spans()
            .into_iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace)
            .collect::<Vec<_>>()
    };
    let mut n = 0;
    let mut send = |lab: &Lab, flags: &str| -> Result<(String, String, String)> {
        n += 1;
        let trace = format!("{n:032x}");
        let parent = format!("{:016x}", 0xabc0 + n);
        let tp = format!("00-{trace}-{parent}-{flags}");
        let r = get(lab, "/", &[("traceparent", &tp)])?;
        Ok((trace, parent, r.body))
    };
    eventually("spans reach the collector", Duration::from_secs(15), || {
        let (trace, _, _) = send(&lab, "01")?;
        std::thread::sleep(Duration::from_millis(1500));
        Ok(!traced(&trace).is_empty())
    })?;

    let mut sent = Vec::new();
    for _ in 0..4 {
        sent.push(send(&lab, "01")?);
    }
    let (untraced, _, _) = send(&lab, "00")?;
    let fresh_served = v1.answers().len();
    let fresh = get(&lab, "/", &[])?;
    ensure!(fresh.status == 200, "{fresh:?}");
    let (last, _, _) = send(&lab, "01")?;
    eventually("the last trace arrives", Duration::from_secs(10), || {
        Ok(traced(&last).len() >= 2)
    })?;
    let mut retried = 0;
    for (trace, parent, body) in &sent {
        let spans = traced(trace);
        let servers: Vec<_> = spans
            .iter()
            .filter(|(_, s)| s.kind == weft_xds::otlp::SPAN_KIND_SERVER)
            .collect();
        ensure!(servers.len() == 1, "trace {trace}: {spans:?}");
        let (resource, server) = servers[0];
        ensure!(
            hex(&server.parent_span_id) == *parent
                && server.name == "reviews.bookinfo.svc.cluster.local:9080/*"
                && attr(&server.attributes, "http.method").as_deref() == Some("GET")
                && attr(&server.attributes, "http.status_code").as_deref() == Some("200")
                && attr(&server.attributes, "upstream_cluster").as_deref()
                    == Some("outbound|9080||reviews.bookinfo.svc.cluster.local")
                && server.status.as_ref().is_some_and(|s| s.code == 0)
                && attr(&server.attributes, "team").as_deref() == Some("bookinfo")
                && attr(&server.attributes, "user").as_deref() == Some("anonymous"),
            "server span of {trace}: {server:?}"
        );
        ensure!(
            attr(resource, "service.name").as_deref() == Some("waypoint.bookinfo"),
            "{resource:?}"
        );
        let mut clients: Vec<_> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.kind == weft_xds::otlp::SPAN_KIND_CLIENT)
            .collect();
        clients.sort_by_key(|s| s.start_time_unix_nano);
        ensure!(
            !clients.is_empty()
                && clients.iter().all(|c| c.parent_span_id == server.span_id
                    && attr(&c.attributes, "team").as_deref() == Some("bookinfo")),
            "client spans of {trace}: {clients:?}"
        );
        let codes: Vec<String> = clients
            .iter()
            .map(|c| attr(&c.attributes, "http.status_code").unwrap_or_default())
            .collect();
        match codes.as_slice() {
            [ok] if ok == "200" => {}
            [failed, ok] if failed == "503" && ok == "200" => {
                retried += 1;
                ensure!(
                    clients[0].status.as_ref().is_some_and(|s| s.code == 2),
                    "a 503 attempt is an error: {:?}",
                    clients[0]
                );
            }
            other => anyhow::bail!("trace {trace}: attempts {other:?}"),
        }
        // The pod saw the last attempt's context, B3 included.
        let answered = clients[clients.len() - 1];
        ensure!(
            body.contains(&format!("x-b3-traceid: {trace}"))
                && body.contains(&format!("x-b3-spanid: {}", hex(&answered.span_id)))
                && body.contains(&format!("x-b3-parentspanid: {}", hex(&server.span_id)))
                && body.contains("x-b3-sampled: 1"),
            "trace {trace}: the pod saw {body}"
        );
    }
    // Round robin over one healthy and one failing pod: a trace retried
    // at least once (each retry moves the cursor on too).
    ensure!(retried >= 1, "{retried} of 4 traces retried");
    ensure!(
        traced(&untraced).is_empty(),
        "a trace the client did not sample was reported"
    );
    // The request without a trace: a new root, sampled at 100%.
    let new_trace = fresh
        .body
        .lines()
        .find_map(|l| l.strip_prefix("x-b3-traceid: "))
        .unwrap_or_default()
        .to_string();
    ensure!(new_trace.len() == 32, "{fresh:?}");
    ensure!(v1.answers().len() > fresh_served);
    eventually("the new trace arrives", Duration::from_secs(5), || {
        Ok(traced(&new_trace).iter().any(|(_, s)| {
            s.kind == weft_xds::otlp::SPAN_KIND_SERVER && s.parent_span_id.is_empty()
        }))
    })?;
    // The collector keeps spans before it answers; the waypoint counts
    // them once it has the answer.
    eventually(
        "every span received is counted exported",
        Duration::from_secs(5),
        || {
            let exported = metric_sum(
                &lab.waypoint_metrics(WAYPOINT_POD)?,
                "weft_waypoint_spans_total",
                &[("outcome", "exported")],
            );
            Ok(exported == collector.spans().len() as f64)
        },
    )?;
    lab.teardown()
}

/// Hostile: a body larger than the retry buffer goes upstream once, whole,
/// and is never sent again; a retry storm against a dead pod (40 requests
/// at once, 10 retries each) is held by the retry budget.
#[test]
fn retries_under_pressure() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("retry-storm", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Status(503))?;
    lab.write_manifest(
        "routes.yaml",
        &routes("  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 3, retryOn: 5xx}\n"),
    )?;
    eventually("retries on", Duration::from_secs(5), || {
        Ok((0..4).all(|_| get(&lab, "/", &[]).is_ok_and(|r| r.status == 200)))
    })?;
    let client = lab.pod("bookinfo/productpage");
    let reviews: SocketAddr = REVIEWS.parse()?;
    let big = vec![b'x'; 2 * 1024 * 1024];
    let before = retry_count(&lab, "retried")?;
    let (mut ok, mut failed) = (0, 0);
    for i in 0..6 {
        let r = apps::http_with_body(client, reviews, "POST", "/big", &[], &big)?;
        ensure!(
            r.body.contains("body 2097152\n"),
            "POST {i}: the body arrived whole once: {r:?}"
        );
        match (r.status, served_by(&r)) {
            (200, "reviews-v1") => ok += 1,
            (503, "reviews-v2") => failed += 1,
            _ => anyhow::bail!("POST {i}: {r:?}"),
        }
    }
    ensure!(
        ok > 0 && failed > 0,
        "round robin reached both pods: {ok} ok, {failed} failed"
    );
    ensure!(
        retry_count(&lab, "retried")? == before,
        "a body over the retry buffer was sent again"
    );

    // The dead pod: its port closed, every attempt fails to connect.
    drop(v2);
    lab.write_manifest(
        "routes.yaml",
        &routes(
            "  - route: [{destination: {host: reviews, subset: v2}}]\n    retries: {attempts: 10, retryOn: connect-failure}\n",
        ),
    )?;
    eventually("only the dead pod", Duration::from_secs(10), || {
        Ok(get(&lab, "/", &[])?.status == 503)
    })?;
    let (retried0, exhausted0) = (
        retry_count(&lab, "retried")?,
        retry_count(&lab, "budget_exhausted")?,
    );
    for status in burst(&lab, 40)? {
        ensure!(status == 503, "a request to a dead pod answered {status}");
    }
    let retried = retry_count(&lab, "retried")? - retried0;
    let exhausted = retry_count(&lab, "budget_exhausted")? - exhausted0;
    ensure!(
        exhausted >= 1.0,
        "the budget refused no retry ({retried} retried)"
    );
    ensure!(
        retried < 200.0,
        "the budget held {retried} retries of the 400 asked"
    );
    println!(
        "retry storm: {retried} retries made, {exhausted} refused by the budget, of 400 asked"
    );
    lab.teardown()
}

/// Starts `app` on reviews' two pods (9080), once their old servers have
/// let go of the port.
fn serve_reviews(lab: &Lab, app: App) -> Result<Vec<apps::Server>> {
    let mut out = Vec::new();
    for pod in ["bookinfo/reviews-v1", "bookinfo/reviews-v2"] {
        let mut s = None;
        eventually("the server starts", Duration::from_secs(2), || {
            s = apps::serve(lab.pod(pod), 9080, app).ok();
            Ok(s.is_some())
        })?;
        out.extend(s);
    }
    Ok(out)
}

/// `n` GETs to reviews at once: their statuses.
fn burst(lab: &Lab, n: usize) -> Result<Vec<u16>> {
    let client = lab.pod("bookinfo/productpage");
    let reviews: SocketAddr = REVIEWS.parse()?;
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || {
                apps::http(&client, reviews, "GET", "/", &[]).map(|r| r.status)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().map_err(|_| anyhow::anyhow!("a client panicked"))?)
        .collect()
}

/// DestinationRule connectionPool beyond connections: `http2MaxRequests`
/// bounds the requests in flight (any protocol), `maxRetries` the retries
/// in flight, and `idleTimeout` how long an unused upstream connection is
/// kept.
#[test]
fn connection_pool_limits() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("pool", MESH))?;
    let servers = serve_reviews(&lab, App::SlowHttp(300))?;
    let dr = |pool: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec:\n  host: reviews\n  trafficPolicy:\n    connectionPool: {pool}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n"
        )
    };
    let overflows = |lab: &Lab| -> Result<f64> {
        Ok(metric_sum(
            &lab.waypoint_metrics(WAYPOINT_POD)?,
            "istio_requests_total",
            &[("response_code", "503"), ("response_flags", "UO")],
        ))
    };

    // Two requests in flight: of 12 at once (each 300 ms), the rest overflow.
    lab.write_manifest("dr.yaml", &dr("{http: {http2MaxRequests: 2}}"))?;
    let mut statuses = Vec::new();
    eventually("http2MaxRequests in force", Duration::from_secs(10), || {
        statuses = burst(&lab, 12)?;
        Ok(statuses.contains(&503))
    })?;
    let before = overflows(&lab)?;
    let statuses = burst(&lab, 12)?;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let over = statuses.iter().filter(|s| **s == 503).count();
    ensure!(
        ok + over == 12 && (1..=6).contains(&ok),
        "2 in flight: {ok} served, {over} overflowed"
    );
    ensure!(
        overflows(&lab)? - before == over as f64,
        "each overflow counted with flag UO"
    );

    // One retry in flight: 10 failing requests at once, retried 5 times
    // each; the second concurrent retry overflows.
    drop(servers);
    let servers = serve_reviews(&lab, App::Status(503))?;
    lab.write_manifest(
        "routes.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 5, retryOn: 5xx}\n",
    )?;
    lab.write_manifest("dr.yaml", &dr("{http: {maxRetries: 1}}"))?;
    let retry_overflows = |lab: &Lab| -> Result<f64> {
        Ok(metric_sum(
            &lab.waypoint_metrics(WAYPOINT_POD)?,
            "weft_waypoint_upstream_retries_total",
            &[("outcome", "overflow")],
        ))
    };
    eventually("maxRetries in force", Duration::from_secs(10), || {
        let before = retry_overflows(&lab)?;
        let statuses = burst(&lab, 10)?;
        ensure!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
        Ok(retry_overflows(&lab)? > before)
    })?;

    // An upstream connection idle longer than idleTimeout is not reused.
    drop(servers);
    let servers = serve_reviews(&lab, App::Http)?;
    lab.write_manifest(
        "routes.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews, subset: v1}}]\n",
    )?;
    let connections = |idle: &str| -> Result<u64> {
        write_applied(&lab, "dr.yaml", &dr(idle), "destination policy applied")?;
        ensure!(get(&lab, "/", &[])?.status == 200);
        // Whatever connection the check left, then two requests 1.5 s apart.
        std::thread::sleep(Duration::from_millis(1500));
        let before = servers[0]
            .accepted
            .load(std::sync::atomic::Ordering::Acquire);
        ensure!(get(&lab, "/", &[])?.status == 200);
        std::thread::sleep(Duration::from_millis(1500));
        ensure!(get(&lab, "/", &[])?.status == 200);
        Ok(servers[0]
            .accepted
            .load(std::sync::atomic::Ordering::Acquire)
            - before)
    };
    let short = connections("{http: {idleTimeout: 1s}}")?;
    let long = connections("{http: {idleTimeout: 60s}}")?;
    ensure!(
        short == 2 && long == 0,
        "idle 1s: {short} new connections for two requests 1.5 s apart; idle 60s: {long}"
    );
    lab.teardown()
}

/// gRPC retry conditions over HTTP/2 to a `grpc` port: a pod that fails
/// every other call with a trailers-only `grpc-status` is retried on the
/// matching condition (`unavailable` 14, `resource-exhausted` 8,
/// `cancelled` 1, `deadline-exceeded` 4), with a streamed request body
/// sent again whole, and not on another condition, whose failures reach
/// the client and are counted with their gRPC status.
#[test]
fn grpc_retry_conditions() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    let mut lab = Lab::up(LabOptions::new("grpc-retry", MESH))?;
    let code = Arc::new(AtomicU32::new(14));
    let calls = Arc::new(AtomicU64::new(0));
    let (c, n) = (code.clone(), calls.clone());
    let _h2 = apps::serve_h2_with(
        lab.pod("bookinfo/reviews-v1"),
        9080,
        Arc::new(move |_, body| {
            let mut t = http::HeaderMap::new();
            if n.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                let status = c.load(Ordering::SeqCst).to_string();
                t.insert(
                    "grpc-status",
                    http::HeaderValue::from_str(&status).expect("digits"),
                );
                (Vec::new(), t)
            } else {
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                (format!("ok {}", body.len()).into_bytes(), t)
            }
        }),
    )?;
    let client = lab.pod("bookinfo/productpage");
    let grpc: SocketAddr = "10.96.0.26:9080".parse()?;
    let call = || apps::h2_post(client, grpc, "/echo.Echo/Call", b"x".to_vec(), 1);
    let set_retry_on = |condition: &str| -> Result<()> {
        write_applied(
            &lab,
            "routes.yaml",
            &format!(
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews-grpc, namespace: bookinfo}}\nspec:\n  hosts: [reviews-grpc]\n  http:\n  - route: [{{destination: {{host: reviews-grpc}}}}]\n    retries: {{attempts: 2, retryOn: {condition}}}\n"
            ),
            "route table applied",
        )
    };
    for (status, condition) in [
        (14, "unavailable"),
        (8, "resource-exhausted"),
        (1, "cancelled"),
        (4, "deadline-exceeded"),
    ] {
        code.store(status, Ordering::SeqCst);
        set_retry_on(condition)?;
        for i in 0..6 {
            let r = call()?;
            ensure!(
                r.grpc_status() == Some("0") && r.body == b"ok 1",
                "{condition}: call {i}: {r:?}"
            );
        }
    }
    // A streamed request body (200 KB in 16 pieces) is sent again whole
    // with the retry.
    let big = vec![7u8; 200_000];
    for i in 0..2 {
        let r = apps::h2_post(client, grpc, "/echo.Echo/Upload", big.clone(), 16)?;
        ensure!(
            r.grpc_status() == Some("0") && r.body == b"ok 200000",
            "upload {i}: {r:?}"
        );
    }
    // Another condition: every other call's status 14 reaches the client.
    code.store(14, Ordering::SeqCst);
    set_retry_on("resource-exhausted")?;
    let failed = (0..6)
        .map(|_| call().map(|r| r.grpc_status() == Some("14")))
        .collect::<Result<Vec<bool>>>()?
        .into_iter()
        .filter(|f| *f)
        .count();
    ensure!(failed == 3, "{failed} of 6 calls saw status 14");
    let counted = metric_sum(
        &lab.waypoint_metrics(WAYPOINT_POD)?,
        "istio_requests_total",
        &[
            ("destination_service_name", "reviews-grpc"),
            ("request_protocol", "grpc"),
            ("grpc_response_status", "14"),
        ],
    );
    ensure!(counted == 3.0, "{counted} counted with grpc status 14");
    lab.teardown()
}

/// DestinationRule `tcp.connectTimeout`: an endpoint that never answers a
/// SYN (an underlay address nobody holds: ARP goes unanswered for about 3 s
/// before the kernel gives up) fails at the timeout with 503 `UF`, well
/// before the kernel would.
#[test]
fn connect_timeout_bounds_a_silent_endpoint() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("connect-timeout", MESH))?;
    let client = lab.pod("bookinfo/productpage");
    let silent: SocketAddr = "10.96.0.91:80".parse()?;
    let manifests = |timeout: &str| {
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: silent, namespace: bookinfo}}
spec:
  hosts: [silent.example]
  addresses: [10.96.0.91]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 10.240.0.99}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: silent, namespace: bookinfo}}
spec:
  hosts: [silent.example]
  http:
  - route: [{{destination: {{host: silent.example}}}}]
    retries: {{attempts: 0}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: silent, namespace: bookinfo}}
spec:
  host: silent.example
  trafficPolicy: {{connectionPool: {{tcp: {{connectTimeout: {timeout}}}}}}}
"#
        )
    };
    let timed = |timeout: &str| -> Result<(Duration, apps::HttpResponse)> {
        write_applied(
            &lab,
            "silent.yaml",
            &manifests(timeout),
            "destination policy applied",
        )?;
        let start = Instant::now();
        let r = apps::http(client, silent, "GET", "/", &[])?;
        Ok((start.elapsed(), r))
    };
    let (short, r) = timed("500ms")?;
    ensure!(r.status == 503, "{r:?}");
    let text = lab.waypoint_metrics(WAYPOINT_POD)?;
    ensure!(
        metric_sum(
            &text,
            "istio_requests_total",
            &[
                ("destination_service", "silent.example"),
                ("response_flags", "UF")
            ]
        ) >= 1.0,
        "counted UF:\n{text}"
    );
    let (long, r) = timed("20s")?;
    ensure!(r.status == 503, "{r:?}");
    println!("connectTimeout 500ms: answered after {short:?}; 20s: after {long:?}");
    ensure!(
        short < Duration::from_millis(1500) && long > short + Duration::from_millis(1000),
        "connectTimeout 500ms answered after {short:?}; 20s (the kernel gives up first) after {long:?}"
    );
    lab.teardown()
}

/// HTTPRoute `retry` (GEP-1731): reviews-v2's 502 (which Istio's default
/// policy does not retry) is retried onto reviews-v1 when its code is
/// listed, and reaches the client with `attempts: 0`.
#[test]
fn http_route_retry() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("hr-retry", MESH))?;
    let _v1 = apps::serve(lab.pod("bookinfo/reviews-v1"), 9080, App::Http)?;
    let _v2 = apps::serve(lab.pod("bookinfo/reviews-v2"), 9080, App::Status(502))?;
    write_applied(&lab, "dr.yaml", ROUND_ROBIN, "destination policy applied")?;
    let route = |retry: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: reviews, port: 9080}}]\n  rules:\n  - backendRefs: [{{name: reviews, port: 9080}}]\n    retry: {retry}\n"
        )
    };
    write_applied(
        &lab,
        "routes.yaml",
        &route("{codes: [502], attempts: 2, backoff: 10ms}"),
        "route table applied",
    )?;
    let before = retry_count(&lab, "retried")?;
    for i in 0..10 {
        let r = get(&lab, "/", &[])?;
        ensure!(
            r.status == 200 && served_by(&r) == "reviews-v1",
            "request {i}: {r:?}"
        );
    }
    let retried = retry_count(&lab, "retried")? - before;
    // Round robin: at least every other request goes to reviews-v2 first
    // (a retry moves the cursor on too).
    ensure!(
        (4.0..=10.0).contains(&retried),
        "{retried} of 10 requests retried"
    );
    write_applied(
        &lab,
        "routes.yaml",
        &route("{attempts: 0}"),
        "route table applied",
    )?;
    let failed = (0..10)
        .map(|_| get(&lab, "/", &[]).map(|r| r.status == 502))
        .collect::<Result<Vec<bool>>>()?
        .into_iter()
        .filter(|f| *f)
        .count();
    ensure!(
        (4..=6).contains(&failed),
        "without retries every other request fails: {failed} of 10"
    );
    lab.teardown()
}
