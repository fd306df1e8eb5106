//! End-to-end: capture outlives ztunnel. Its program, links and maps are pinned,
//! so while no ztunnel runs a captured pod's traffic is dropped, never sent in
//! plaintext; a new ztunnel adopts what is pinned; only an uninstall removes it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use weft_tests::apps::{self, App};
use weft_tests::check::eventually;
use weft_tests::lab::LabPod;
use weft_tests::{Lab, LabOptions, tcpdump};

const SCENARIO: &str = include_str!("../../examples/l4/mesh.yaml");

fn addr(pod: &LabPod, port: u16) -> SocketAddr {
    SocketAddr::new(pod.ip.into(), port)
}

/// One echo round trip of `msg` on `conn`.
fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> Result<()> {
    conn.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back)?;
    ensure!(
        back == msg,
        "echo returned {:?}",
        String::from_utf8_lossy(&back)
    );
    Ok(())
}

/// A connection attempt from `pod` that must not get through: Err(reason) if it did.
fn connect_fails(pod: &LabPod, dst: SocketAddr, within: Duration) -> Result<()> {
    let outcome = pod
        .netns
        .run(move || Ok(TcpStream::connect_timeout(&dst, within).map(drop)))?;
    ensure!(
        outcome.is_err(),
        "a connection to {dst} got through with no ztunnel on the node"
    );
    Ok(())
}

/// With node-1's ztunnel killed (SIGKILL, as a crash or an OOM kill):
/// - a captured pod's new connection to a pod on node-2 fails (its SYNs are
///   dropped), and nothing of it reaches the underlay;
/// - on a connection opened through ztunnel before the crash, bytes the pod
///   writes once ztunnel's sockets are gone are dropped, never forwarded in
///   plaintext;
/// - a restarted ztunnel adopts the pinned capture, including its counters,
///   and new connections work again with no operator action.
#[test]
fn capture_fails_closed_while_ztunnel_is_down() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("fail-closed", SCENARIO))?;
    let client = lab.pod("shop/client").clone();
    let web = lab.pod("shop/web-1").clone();
    let node1 = lab.node("node-1").clone();
    let _echo = apps::serve(&web, 9003, App::Echo)?;
    // ztunnel's closed sockets linger in FIN_WAIT2 and TIME_WAIT for a
    // minute by default; shortened here so the test sees the moment they
    // are gone, when only the flow table stands between the pod and the wire.
    node1.netns.sysctl("net.ipv4.tcp_fin_timeout", "1")?;

    let mut open = apps::client(&client, addr(&web, 9003), Ok)?;
    round_trip(&mut open, b"before the crash")?;

    let pcap = lab.dir().join("underlay.pcap");
    let cap = tcpdump::Tcpdump::start(&node1.netns, &node1.underlay_iface, &pcap)?;
    lab.kill_ztunnel("node-1")?;
    ensure!(
        lab.pin_dir("node-1").join("maps/weft_captured").exists(),
        "the pod map is not pinned after ztunnel died"
    );

    // New connections: refused by silence.
    connect_fails(&client, addr(&web, 9003), Duration::from_secs(2))?;
    // Open connection: ztunnel's socket (FIN_WAIT2, then TIME_WAIT) is gone
    // after about 2 × tcp_fin_timeout; then the pod writes.
    std::thread::sleep(Duration::from_secs(3));
    let marker = b"weft-orphaned-flow-marker-51f3";
    let _ = open.write_all(marker);
    // Let the pod's stack retransmit a few times.
    std::thread::sleep(Duration::from_secs(2));
    drop(open);
    let pcap = cap.stop()?;

    let raw = std::fs::read(&pcap)?;
    ensure!(
        !raw.windows(marker.len()).any(|w| w == marker),
        "the orphaned flow's bytes crossed the underlay in plaintext"
    );
    let direct = tcpdump::read(&pcap, "tcp port 9003")?;
    ensure!(
        direct.is_empty(),
        "segments to :9003 left node-1 without the mesh: {:?}",
        &direct[..direct.len().min(5)]
    );

    let restarted = Instant::now();
    lab.start_ztunnel_again("node-1")?;
    let mut tries = 0;
    eventually(
        "a new connection through the restarted ztunnel",
        Duration::from_secs(30),
        || {
            tries += 1;
            Ok(apps::client(&client, addr(&web, 9003), |mut c| {
                round_trip(&mut c, b"after the restart")
            })
            .is_ok())
        },
    )?;
    println!(
        "restart gap: {:?} from start to the first good connection ({tries} tries)",
        restarted.elapsed()
    );
    lab.wait_ztunnel_ready("node-1")?;

    // The counters are the pinned ones, kept across the crash.
    let counters = &lab.config_dump("node-1")?["capture"]["counters"];
    let count = |name: &str| counters[name].as_u64().unwrap_or(0);
    ensure!(
        count("no_listener") >= 1,
        "no dropped SYN counted: {counters}"
    );
    ensure!(
        count("orphaned") >= 1,
        "no orphaned segment counted: {counters}"
    );
    ensure!(count("outbound") >= 2, "outbound not counted: {counters}");
    // One pinned link per interface of the node, re-adopted, none leaked.
    let links = std::fs::read_dir(lab.pin_dir("node-1").join("links"))?.count();
    let ifaces = lab.config_dump("node-1")?["capture"]["interfaces"]
        .as_array()
        .map_or(0, Vec::len);
    ensure!(
        links == ifaces && ifaces > 0,
        "{links} pinned links for {ifaces} interfaces"
    );
    Ok(())
}

/// `ztunnel uninstall` removes the node's pinned links and maps: with ztunnel
/// stopped and capture uninstalled, the pod's traffic takes the direct path
/// again, instead of being dropped as while ztunnel is merely down.
#[test]
fn uninstall_releases_the_node() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("uninstall", SCENARIO))?;
    let client = lab.pod("shop/client").clone();
    let web = lab.pod("shop/web-1").clone();
    let node1 = lab.node("node-1").clone();
    let _who = apps::serve(&web, 9002, App::WhoAmI)?;

    lab.kill_ztunnel("node-1")?;
    connect_fails(&client, addr(&web, 9002), Duration::from_secs(2))?;

    let pin_dir = lab.pin_dir("node-1");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", node1.netns.name()])
        .arg(weft_tests::lab::bin_dir().join("ztunnel"))
        .arg("uninstall")
        .env("BPF_PIN_DIR", &pin_dir)
        .output()
        .context("running ztunnel uninstall")?;
    ensure!(
        out.status.success(),
        "ztunnel uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    released(&lab, &client, &web)
}

/// Node-1 no longer captures: its pins and policy route are gone, and the
/// client's traffic takes the direct path (node-2 still captures web-1,
/// which accepts plaintext, PERMISSIVE, and sees the client's own address).
fn released(lab: &Lab, client: &LabPod, web: &LabPod) -> Result<()> {
    let pin_dir = lab.pin_dir("node-1");
    ensure!(!pin_dir.exists(), "{} still exists", pin_dir.display());
    let rules = lab.node("node-1").netns.ip(&["-4", "rule", "show"])?;
    ensure!(
        !rules.contains("lookup 15001"),
        "policy route left: {rules}"
    );
    let seen = apps::whoami(client, addr(web, 9002))?;
    ensure!(seen.ip() == client.ip, "server saw {seen}");
    Ok(())
}

/// SIGTERM reaches ztunnel for a rollout and for a removal alike; it asks
/// the API server which it is, as istio-cni does. While its DaemonSet
/// exists and selects the node, capture stays (traffic is dropped until a
/// ztunnel is back); once the DaemonSet is gone (helm uninstall), the
/// stopping ztunnel removes capture, so the node's pods are not cut off.
#[test]
fn sigterm_tells_a_rollout_from_a_removal() -> Result<()> {
    let mut lab = Lab::up(LabOptions::new("removal", SCENARIO))?;
    let client = lab.pod("shop/client").clone();
    let web = lab.pod("shop/web-1").clone();
    let node1 = lab.node("node-1").clone();
    let _who = apps::serve(&web, 9002, App::WhoAmI)?;
    let api = weft_tests::kubeapi::FakeApi::start(&node1.netns, &lab.dir().join("sa-node-1"))?;
    let ds_path = "/apis/apps/v1/namespaces/istio-system/daemonsets/ztunnel";
    let daemonset = serde_json::json!({"metadata": {"name": "ztunnel"},
        "spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/os": "linux"}}}}});
    api.set(ds_path, Some(daemonset));
    api.set(
        "/api/v1/nodes/node-1",
        Some(serde_json::json!({"metadata": {"name": "node-1", "labels": {"kubernetes.io/os": "linux"}}})),
    );
    lab.add_ztunnel_env(api.ztunnel_env("istio-system", "ztunnel"));
    lab.kill_ztunnel("node-1")?;
    lab.start_ztunnel_again("node-1")?;
    lab.wait_ztunnel_ready("node-1")?;
    ensure!(apps::whoami(&client, addr(&web, 9002))?.ip() == client.ip);

    // A rollout: the DaemonSet still selects the node. Capture stays.
    let status = lab.stop_ztunnel("node-1", Duration::from_secs(15))?;
    ensure!(status.success(), "ztunnel exited with {status}");
    ensure!(
        lab.ztunnel_log("node-1")
            .contains("capture stays for the next ztunnel"),
        "no rollout verdict in the log"
    );
    connect_fails(&client, addr(&web, 9002), Duration::from_secs(2))?;
    ensure!(
        lab.pin_dir("node-1").exists(),
        "capture was removed on a rollout"
    );

    // helm uninstall: the DaemonSet is gone. Capture goes with ztunnel.
    lab.start_ztunnel_again("node-1")?;
    lab.wait_ztunnel_ready("node-1")?;
    api.set(ds_path, None);
    let status = lab.stop_ztunnel("node-1", Duration::from_secs(15))?;
    ensure!(status.success(), "ztunnel exited with {status}");
    let log = lab.ztunnel_log("node-1");
    ensure!(
        log.contains("the DaemonSet no longer exists") && log.contains("capture uninstalled"),
        "no removal in the log"
    );
    released(&lab, &client, &web)?;
    // ztunnel asked with its service account token.
    let asked = api.asked.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(
        asked.iter().any(|(p, ok)| p == ds_path && *ok),
        "asked: {asked:?}"
    );
    Ok(())
}
