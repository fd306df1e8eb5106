//! `cargo xtask demo`: the L4 mesh on two lab nodes, with real traffic, and
//! what it looked like: client addresses, the wire, refusals, metrics, and
//! Istio policy applied as a manifest; then a waypoint on a second lab:
//! Istio's VirtualService, an HTTPRoute, an L7 AuthorizationPolicy and the
//! request metrics.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weft_hbone::ca::Ca;
use weft_tests::apps::{self, App};
use weft_tests::check::{eventually, metric_sum};
use weft_tests::peer::{self, Attempt, Outcome};
use weft_tests::{Lab, LabOptions, tcpdump};

use crate::lab::{print_lab, scenario};
use crate::util::{build_bins, require_root};

fn curl(lab: &Lab, pod: &str, url: &str) -> Result<String> {
    let out = lab
        .pod(pod)
        .netns
        .exec_output("curl", &["-sS", "--max-time", "5", url])?;
    if !out.status.success() {
        bail!(
            "curl {url} from {pod}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn run() -> Result<()> {
    require_root("cargo xtask demo")?;
    let bins = build_bins(false)?;
    let mut opts = LabOptions::new("demo", &scenario("l4")?);
    opts.bin_dir = bins.clone();
    println!("\n== Weft demo: examples/l4 — namespace shop is ambient, legacy is not ==");
    let started = Instant::now();
    let lab = Lab::up(opts)?;
    println!("({:.1}s)", started.elapsed().as_secs_f32());
    print_lab(&lab);
    let mut servers = Vec::new();
    for pod in ["shop/web-1", "shop/web-2", "legacy/plain"] {
        servers.push(apps::serve(lab.pod(pod), 8080, App::Http)?);
    }

    println!("\n1. shop/client (node-1) -> shop/web-1 (node-2): curl http://10.244.2.10:8080/");
    let pcap = lab.dir().join("demo.pcap");
    let cap = tcpdump::Tcpdump::start(&lab.node("node-1").netns, "eth0", &pcap).ok();
    let reply = curl(&lab, "shop/client", "http://10.244.2.10:8080/")?;
    println!("   {reply}   <- the server sees the client's own address");
    if let Some(cap) = cap {
        let pcap = cap.stop()?;
        let all = tcpdump::read(&pcap, "tcp")?;
        let hbone = tcpdump::read(&pcap, "tcp port 15008")?;
        let raw = std::fs::read(&pcap)?;
        let plaintext = raw.windows(10).any(|w| w == b"hello from");
        println!(
            "   on the underlay: {} TCP packets, {} of them HBONE (port 15008); TLS 1.3 records: {}; plaintext \"hello from\" seen: {}",
            all.len(),
            hbone.len(),
            if raw.windows(3).any(|w| w == [0x17, 0x03, 0x03]) {
                "yes"
            } else {
                "no"
            },
            if plaintext { "YES (bad)" } else { "no" }
        );
    } else {
        println!("   (install tcpdump to see the wire)");
    }

    println!("\n2. shop/client -> Service web (10.96.0.10:80 -> pods' port 'http'), four calls:");
    for _ in 0..4 {
        println!("   {}", curl(&lab, "shop/client", "http://10.96.0.10/")?);
    }
    println!("   round robin over web-1 (other node, HBONE) and web-2 (same node, in-process)");

    println!(
        "\n3. legacy/outsider (not in the mesh) -> shop/web-1: plaintext, accepted (PERMISSIVE)"
    );
    println!(
        "   {}",
        curl(&lab, "legacy/outsider", "http://10.244.2.10:8080/")?
    );
    println!("   legacy/outsider -> legacy/plain: no mesh on either side, untouched");
    println!(
        "   {}",
        curl(&lab, "legacy/outsider", "http://10.244.2.20:8080/")?
    );

    println!("\n4. A forged peer: valid-looking certificate for shop/client, from another CA,");
    println!("   dials web-1's HBONE port from legacy/outsider:");
    let forged_ca = Ca::generate("cluster.local").context("generating the forged CA")?;
    let client_id = "spiffe://cluster.local/ns/shop/sa/client".parse()?;
    let web_id = "spiffe://cluster.local/ns/shop/sa/web".parse()?;
    let cert = forged_ca.issue(&client_id, Duration::from_secs(3600))?;
    let roots = weft_hbone::tls::TrustRoots::from_pem(lab.ca()?.cert_pem())?;
    let web = lab.pod("shop/web-1");
    let outcome = peer::attempt(
        lab.pod("legacy/outsider"),
        Attempt {
            server: SocketAddr::new(web.ip.into(), 15008),
            expect: web_id,
            cert: Some(cert),
            roots,
            target: SocketAddr::new(web.ip.into(), 8080),
            forwarded: Some(lab.pod("shop/client").ip.into()),
            payload: b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        },
    )?;
    match outcome {
        Outcome::Open(_) => bail!("the forged peer got through"),
        Outcome::Refused(code) => println!("   refused: HTTP {code}"),
        Outcome::Failed(e) => println!("   refused during the handshake: {e}"),
    }

    println!("\n5. Metrics (node-2, istio_tcp_connections_opened_total, reporter=destination):");
    eventually("metrics", Duration::from_secs(5), || {
        let m = lab.metrics("node-2")?;
        Ok(metric_sum(
            &m,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")],
        ) >= 4.0)
    })?;
    let m = lab.metrics("node-2")?;
    for line in m.lines().filter(|l| {
        l.starts_with("istio_tcp_connections_opened_total")
            || l.starts_with("weft_connections_refused_total")
    }) {
        let short: Vec<&str> = line
            .split(',')
            .filter(|kv| {
                [
                    "source_workload",
                    "destination_workload",
                    "connection_security_policy",
                    "reason",
                    "} ",
                ]
                .iter()
                .any(|k| kv.contains(k))
                    || kv.starts_with("istio")
                    || kv.starts_with("weft")
            })
            .collect();
        println!("   {}", short.join(","));
    }
    policy(&lab)?;
    drop(servers);
    println!("\n== removing the lab ==");
    drop(lab);
    waypoint(&bins)?;
    println!("done: no namespaces, links, programs or processes left behind.");
    Ok(())
}

/// Istio's policy kinds, as a user applies them.
const POLICY: &str = r#"apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/shop/sa/client"]}
"#;

/// Step 6: a PeerAuthentication and an AuthorizationPolicy, written to the
/// controller's manifests directory, enforced by the destination's ztunnel.
fn policy(lab: &Lab) -> Result<()> {
    println!("\n6. Policy, as a manifest (what kubectl apply is in a cluster):");
    println!("   PeerAuthentication shop/default: STRICT");
    println!(
        "   AuthorizationPolicy shop/web-from-client: app=web ALLOW from principal cluster.local/ns/shop/sa/client"
    );
    let start = Instant::now();
    lab.write_manifest("policy.yaml", POLICY)?;
    let url = "http://10.244.2.10:8080/";
    eventually("the policy is in force", Duration::from_secs(5), || {
        Ok(curl(lab, "legacy/outsider", url).is_err())
    })?;
    println!(
        "   in force on new connections after {} ms",
        start.elapsed().as_millis()
    );
    for (pod, allowed, why) in [
        ("shop/client", true, "allowed by principal"),
        (
            "shop/web-2",
            false,
            "mTLS, but principal shop/sa/web is not allowed",
        ),
        ("legacy/outsider", false, "plaintext: STRICT refuses it"),
    ] {
        match (curl(lab, pod, url), allowed) {
            (Ok(reply), true) => println!("   {pod:<16} -> shop/web-1: {reply}   ({why})"),
            (Err(_), false) => println!("   {pod:<16} -> shop/web-1: refused   ({why})"),
            (Ok(_), false) => bail!("{pod} got through to shop/web-1; the policy should refuse it"),
            (Err(e), true) => bail!("{pod} was refused: {e:#}"),
        }
    }
    println!("   node-2 counts each denial by the policy that decided it:");
    let m = lab.metrics("node-2")?;
    for line in m
        .lines()
        .filter(|l| l.starts_with("weft_policy_denials_total"))
    {
        println!("   {line}");
    }
    Ok(())
}

/// Istio's reviews routing, unchanged: jason to v2, the rest 90/10 v1/v3.
const ROUTES: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v3}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"#;

/// Gateway API's HTTPRoute on ratings: /api/... is served as /v2/...
const HTTPROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ratings, namespace: bookinfo}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings, port: 9080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    backendRefs: [{name: ratings, port: 9080}]
"#;

/// An L7 AuthorizationPolicy on the waypoint.
const NO_DELETE: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-delete, namespace: bookinfo}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
"#;

/// reviews' routes for steps 12 and 13: `rules` under `http:`, over all of
/// reviews' pods in turn.
fn reviews_routes(rules: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec:\n  hosts: [reviews]\n  http:\n{rules}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: reviews, namespace: bookinfo}}\nspec:\n  host: reviews\n  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}\n"
    )
}

/// Requests from productpage to reviews, `n` of them: how many answered 200.
fn successes(lab: &Lab, n: usize, headers: &[(&str, &str)]) -> Result<usize> {
    let client = lab.pod("bookinfo/productpage");
    let reviews: SocketAddr = "10.96.0.20:9080".parse()?;
    let mut ok = 0;
    for _ in 0..n {
        if apps::http(client, reviews, "GET", "/", headers)?.status == 200 {
            ok += 1;
        }
    }
    Ok(ok)
}

/// The waypoint's request count for reviews whose response flags include
/// `flag`.
fn flagged(lab: &Lab, flag: &str) -> Result<f64> {
    let m = lab.waypoint_metrics("bookinfo/waypoint-0")?;
    Ok(m.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .filter(|l| {
            l.split("response_flags=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .is_some_and(|f| f.split(',').any(|x| x == flag))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Steps 12-14: retries, faults and a circuit breaker, on Istio's YAML.
fn resilience(lab: &Lab, servers: &mut Vec<apps::Server>) -> Result<()> {
    let pods = [
        "bookinfo/reviews-v1",
        "bookinfo/reviews-v2",
        "bookinfo/reviews-v3",
    ];
    let restart = |servers: &mut Vec<apps::Server>, app: App| -> Result<()> {
        servers.clear();
        for pod in pods {
            let mut s = None;
            // The old server lets go of the port within its poll period.
            eventually("the server restarts", Duration::from_secs(2), || {
                s = apps::serve(lab.pod(pod), 9080, app).ok();
                Ok(s.is_some())
            })?;
            servers.extend(s);
        }
        Ok(())
    };

    println!("\n12. Retries: every reviews pod now answers 503 to every other request");
    restart(servers, App::Flaky(503))?;
    lab.write_manifest(
        "reviews.yaml",
        &reviews_routes(
            "  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 0}\n",
        ),
    )?;
    eventually("no retries", Duration::from_secs(5), || {
        Ok(successes(lab, 10, &[])? < 10)
    })?;
    let without = successes(lab, 200, &[])?;
    lab.write_manifest(
        "reviews.yaml",
        &reviews_routes(
            "  - route: [{destination: {host: reviews}}]\n    retries: {attempts: 3, retryOn: 5xx}\n",
        ),
    )?;
    eventually("retries on 5xx", Duration::from_secs(5), || {
        Ok(successes(lab, 10, &[])? == 10)
    })?;
    let with = successes(lab, 200, &[])?;
    println!("   retries: {{attempts: 0}}                   {without:>3} of 200 succeed");
    println!("   retries: {{attempts: 3, retryOn: 5xx}}     {with:>3} of 200 succeed");

    println!("\n13. Fault injection for end-user jason: 50% aborted with 503, 50% delayed 50 ms");
    restart(servers, App::Http)?;
    lab.write_manifest(
        "reviews.yaml",
        &reviews_routes(
            "  - match: [{headers: {end-user: {exact: jason}}}]\n    fault:\n      abort: {httpStatus: 503, percentage: {value: 50}}\n      delay: {fixedDelay: 50ms, percentage: {value: 50}}\n    route: [{destination: {host: reviews}}]\n  - route: [{destination: {host: reviews}}]\n",
        ),
    )?;
    eventually("the fault is in force", Duration::from_secs(5), || {
        Ok(successes(lab, 10, &[("end-user", "jason")])? < 10)
    })?;
    let (di, fi) = (flagged(lab, "DI")?, flagged(lab, "FI")?);
    let jason = successes(lab, 200, &[("end-user", "jason")])?;
    let others = successes(lab, 200, &[])?;
    let (delayed, aborted) = (flagged(lab, "DI")? - di, flagged(lab, "FI")? - fi);
    println!(
        "   jason:  {jason:>3} of 200 succeed; the waypoint flagged {aborted} aborted (FI), {delayed} delayed (DI)"
    );
    println!("   others: {others:>3} of 200 succeed");

    println!(
        "\n14. Circuit breaker: DestinationRule connectionPool maxConnections 1, http1MaxPendingRequests 1;"
    );
    println!("   reviews answers after 200 ms; 20 requests at once");
    restart(servers, App::SlowHttp(200))?;
    lab.write_manifest(
        "reviews.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: bookinfo}\nspec:\n  host: reviews\n  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 1}\n      http: {http1MaxPendingRequests: 1}\n",
    )?;
    let burst = || -> Result<(usize, usize)> {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let client = lab.pod("bookinfo/productpage").clone();
                std::thread::spawn(move || {
                    apps::http(
                        &client,
                        "10.96.0.20:9080".parse().expect("an address"),
                        "GET",
                        "/",
                        &[],
                    )
                    .map(|r| r.status)
                })
            })
            .collect();
        let mut statuses = Vec::new();
        for h in handles {
            statuses.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a request thread panicked"))??,
            );
        }
        Ok((
            statuses.iter().filter(|s| **s == 200).count(),
            statuses.iter().filter(|s| **s == 503).count(),
        ))
    };
    let uo = flagged(lab, "UO")?;
    let mut seen = (0, 0);
    eventually("the breaker trips", Duration::from_secs(10), || {
        seen = burst()?;
        Ok(seen.1 > 0)
    })?;
    let tripped = flagged(lab, "UO")? - uo;
    println!(
        "   {} answered 200, {} got 503 with flag UO (istio_requests_total{{response_flags=\"UO\"}} +{tripped})",
        seen.0, seen.1
    );
    Ok(())
}

/// Steps 7-11: the waypoint, on a lab of its own (examples/l7).
fn waypoint(bins: &std::path::Path) -> Result<()> {
    println!("\n== Waypoint: examples/l7 — bookinfo is ambient and uses waypoint `waypoint` ==");
    let mut opts = LabOptions::new("demo-l7", &scenario("l7")?);
    opts.bin_dir = bins.to_path_buf();
    let started = Instant::now();
    let lab = Lab::up(opts)?;
    let wp = lab.pod("bookinfo/waypoint-0");
    println!(
        "\n7. Gateway bookinfo/waypoint (class istio-waypoint) -> waypoint pod {} on {} ({:.1}s to ready);",
        wp.ip,
        wp.node,
        started.elapsed().as_secs_f32()
    );
    println!("   namespace label istio.io/use-waypoint=waypoint binds its services to it");
    let mut servers = Vec::new();
    for pod in [
        "bookinfo/reviews-v1",
        "bookinfo/reviews-v2",
        "bookinfo/reviews-v3",
        "bookinfo/ratings-v1",
    ] {
        servers.push(apps::serve(lab.pod(pod), 9080, App::Http)?);
    }
    let client = lab.pod("bookinfo/productpage");
    let reviews: SocketAddr = "10.96.0.20:9080".parse()?;
    let r = apps::http(client, reviews, "GET", "/", &[])?;
    println!(
        "   productpage -> reviews: {}",
        r.body.lines().next().unwrap_or_default()
    );
    println!("   (the app sees the waypoint as its peer; the client is in X-Forwarded-For)");

    println!(
        "\n8. VirtualService reviews: end-user jason -> v2; the rest 90/10 v1/v3 (DestinationRule subsets)"
    );
    lab.write_manifest("reviews.yaml", ROUTES)?;
    let by = |r: &apps::HttpResponse| {
        r.body
            .strip_prefix("hello from ")
            .and_then(|b| b.split(',').next())
            .unwrap_or("?")
            .to_string()
    };
    // Routes and subsets are two resources: wait until the waypoint has
    // them (a lucky first request without routes would prove nothing).
    eventually("the routes are in force", Duration::from_secs(5), || {
        let log = lab.waypoint_log("bookinfo/waypoint-0");
        Ok(log.contains("route table applied")
            && (0..3).all(|_| {
                apps::http(client, reviews, "GET", "/", &[("end-user", "jason")])
                    .is_ok_and(|r| by(&r) == "reviews-v2")
            }))
    })?;
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let r = apps::http(client, reviews, "GET", "/", &[("end-user", "jason")])?;
        *counts.entry(format!("jason -> {}", by(&r))).or_insert(0) += 1;
    }
    for _ in 0..200 {
        let r = apps::http(client, reviews, "GET", "/", &[])?;
        *counts.entry(format!("others -> {}", by(&r))).or_insert(0) += 1;
    }
    for (what, n) in &counts {
        println!("   {what:<22} {n:>3} of 200");
    }

    println!("\n9. HTTPRoute ratings: PathPrefix /api rewritten to /v2");
    lab.write_manifest("ratings.yaml", HTTPROUTE)?;
    let ratings: SocketAddr = "10.96.0.30:9080".parse()?;
    eventually("the HTTPRoute is in force", Duration::from_secs(5), || {
        Ok(apps::http(client, ratings, "GET", "/api/ratings/1", &[])
            .is_ok_and(|r| r.body.contains("path /v2/")))
    })?;
    let r = apps::http(client, ratings, "GET", "/api/ratings/1", &[])?;
    println!(
        "   GET /api/ratings/1 -> the app saw: {}",
        r.body.lines().nth(1).unwrap_or_default()
    );

    println!("\n10. AuthorizationPolicy no-delete (targetRefs: the waypoint): DENY method DELETE");
    lab.write_manifest("no-delete.yaml", NO_DELETE)?;
    eventually("the policy is in force", Duration::from_secs(5), || {
        Ok(apps::http(client, reviews, "DELETE", "/", &[])?.status == 403)
    })?;
    let del = apps::http(client, reviews, "DELETE", "/", &[])?;
    let get = apps::http(client, reviews, "GET", "/", &[])?;
    println!("   DELETE /: {} {}", del.status, del.body);
    println!(
        "   GET /:    {} {}",
        get.status,
        get.body.lines().next().unwrap_or_default()
    );
    let direct = apps::http(client, "10.244.2.10:9080".parse()?, "GET", "/", &[]);
    println!(
        "   GET straight to a reviews pod's IP (around the waypoint): {}",
        match direct {
            Ok(r) => format!("{} (not refused!)", r.status),
            Err(_) =>
                "refused by its ztunnel: with L7 policy bound, only the waypoint may call it".into(),
        }
    );

    println!(
        "\n11. Request metrics, reported by the waypoint (istio_requests_total, reporter=waypoint):"
    );
    let m = lab.waypoint_metrics("bookinfo/waypoint-0")?;
    for line in m.lines().filter(|l| l.starts_with("istio_requests_total{")) {
        let short: Vec<&str> = line
            .split(',')
            .filter(|kv| {
                [
                    "destination_workload=",
                    "response_code=",
                    "source_workload=",
                    "} ",
                ]
                .iter()
                .any(|k| kv.contains(k))
                    || kv.starts_with("istio")
            })
            .collect();
        println!("   {}", short.join(","));
    }
    resilience(&lab, &mut servers)?;
    drop(servers);
    println!("\n== removing the waypoint lab ==");
    drop(lab);
    Ok(())
}
