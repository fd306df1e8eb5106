//! `cargo xtask <command>`: Weft's developer commands.
//!
//! Each command is a function in its own module; this file only dispatches.

mod bench;
mod bench_waypoint;
mod chart;
mod demo;
mod ebpf;
mod fuzz;
mod image;
mod lab;
mod proto;
mod test;
mod util;

use anyhow::{Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

  demo                     run a two-node mesh on this host, send traffic, show what happened (root)
  test                     every check CI runs: format, eBPF object, unit and end-to-end tests (root)
  lab up [SCENARIO] [--release]
                           start a lab from examples/SCENARIO (default l4), optimized binaries
                           with --release (to profile); Ctrl-C removes it (root)
  lab down                 remove every lab on this host, also ones left by a crash
  lab status               list the labs on this host
  ebpf [--check]           rebuild ebpf/bpf/capture.bpf.o with clang (--check: fail if it is stale)
  proto [--check]          regenerate xds/src/generated/ from xds/proto/ (--check: fail if it is stale)
  bench l4                 pod-to-pod throughput and latency, plain vs mesh; ztunnel memory (root)
  bench l4 --throughput [--baseline ZTUNNEL [--rounds N]]
                           only the throughput, latency and CPU-per-GB phases; with
                           another build's ztunnel binary, CPU per GB of both, taking turns,
                           N runs each (default 5) (root)
  bench restart            connections failed across rolling restarts of each node, and the gap after a crash (root)
  bench controller         10 000 pods, 1 000 services, 100 xDS clients: first push, change latency, RSS
  bench waypoint           the waypoint's HTTP engine against Envoy, same routes and backend, pinned (root)
  chart                    lint and render charts/weft with each values file; validate every object
                           against Kubernetes' and the CRDs' schemas; check the DaemonSet's rules
  image                    build the images from Containerfile (docker or podman)
  fuzz TARGET|all [--secs N]  run the fuzz targets in fuzz/ (libFuzzer)
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["demo"] => demo::run(),
        ["test", rest @ ..] => test::run(rest),
        ["lab", "up"] => lab::up("l4", false),
        ["lab", "up", "--release"] => lab::up("l4", true),
        ["lab", "up", scenario] => lab::up(scenario, false),
        ["lab", "up", scenario, "--release"] => lab::up(scenario, true),
        ["lab", "down"] => lab::down(),
        ["lab", "status"] => lab::status(),
        ["chart"] => chart::run(),
        ["image"] => image::run(),
        ["ebpf"] => ebpf::build(false),
        ["ebpf", "--check"] => ebpf::build(true),
        ["proto"] => proto::run(false),
        ["proto", "--check"] => proto::run(true),
        ["bench", "l4"] => bench::l4(bench::L4::Full),
        ["bench", "l4", "--throughput"] => bench::l4(bench::L4::Throughput { baseline: None }),
        ["bench", "l4", "--throughput", "--baseline", bin] => bench::l4(bench::L4::Throughput {
            baseline: Some((bin.into(), bench::BASELINE_ROUNDS)),
        }),
        [
            "bench",
            "l4",
            "--throughput",
            "--baseline",
            bin,
            "--rounds",
            n,
        ] => {
            let rounds = n
                .parse()
                .ok()
                .filter(|r| (1..=100).contains(r))
                .ok_or_else(|| anyhow::anyhow!("--rounds {n}: want 1 to 100"))?;
            bench::l4(bench::L4::Throughput {
                baseline: Some((bin.into(), rounds)),
            })
        }
        ["bench", "controller"] => bench::controller(),
        ["bench", "restart"] => bench::restart(),
        ["bench", "waypoint"] => bench_waypoint::run(),
        ["fuzz", rest @ ..] => fuzz::run(rest),
        // Internal: the bench's echo server, run in a pod's namespace.
        ["__echo-forever", port] => weft_tests::apps::echo_forever(port.parse()?),
        // Internal: the waypoint bench's HTTP backend, run in a pod's namespace.
        ["__http-backend", port, name] => {
            weft_tests::apps::http_backend_forever(port.parse()?, name)
        }
        ["help"] | ["--help"] | ["-h"] | [] => {
            print!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown command {:?}\n\n{USAGE}", args.join(" ")),
    }
}
