//! Who is calling: node agents (ztunnel) and workload proxies (waypoints)
//! authenticate with a bearer token. In local mode tokens come from a file
//! (`<node> <token>` or `<spiffe identity> <token>` per line); the
//! Kubernetes source reviews service account tokens instead.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use weft_api::Identity;
use weft_xds::types::Role;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node agent, acting for the pods on its node.
    Node { node: String },
    /// A proxy that runs as one workload identity (a waypoint), acting for itself.
    Workload { identity: Identity },
}

impl Caller {
    pub fn role(&self) -> Role {
        match self {
            Caller::Node { .. } => Role::Ztunnel,
            Caller::Workload { .. } => Role::Waypoint,
        }
    }

    /// The node of a node agent.
    pub fn node(&self) -> Option<&str> {
        match self {
            Caller::Node { node } => Some(node),
            Caller::Workload { .. } => None,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node { node } => write!(f, "node {node}"),
            Caller::Workload { identity } => write!(f, "{identity}"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("unknown token")]
    Unknown,
    /// The API server reviewed the token and it does not make a node agent.
    #[error("{0}")]
    Rejected(String),
    /// The token could not be reviewed now.
    #[error("{0}")]
    Unavailable(String),
}

/// How node agents prove who they are.
#[derive(Clone, Debug)]
pub enum Authenticator {
    /// Local mode: a bootstrap token per node.
    Tokens(NodeTokens),
    /// Kubernetes: the agent's service account token, reviewed by the API server.
    Kubernetes(crate::kubernetes::TokenReviewer),
}

impl Authenticator {
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Caller, AuthError> {
        match self {
            Authenticator::Tokens(t) => t.authenticate(token),
            Authenticator::Kubernetes(r) => r.authenticate(token.ok_or(AuthError::Missing)?).await,
        }
    }
}

/// Bootstrap tokens: per node, and per workload identity.
#[derive(Clone, Default)]
pub struct NodeTokens {
    /// Node name or SPIFFE identity → token.
    by_node: BTreeMap<String, String>,
}

impl std::fmt::Debug for NodeTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTokens")
            .field("nodes", &self.by_node.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Equal contents in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl NodeTokens {
    /// Parses `<node> <token>` and `<spiffe://identity> <token>` lines; blank
    /// lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut by_node = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(who), Some(token), None) if token.len() >= 16 => {
                    if who.starts_with("spiffe://") {
                        who.parse::<Identity>()
                            .map_err(|e| format!("line {}: {e}", i + 1))?;
                    }
                    by_node.insert(who.to_string(), token.to_string());
                }
                _ => {
                    return Err(format!(
                        "line {}: want `<node or spiffe identity> <token>` with a token of at least 16 characters",
                        i + 1
                    ));
                }
            }
        }
        Ok(NodeTokens { by_node })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The node or identity a token belongs to. Every entry is compared, so
    /// the time taken does not say which token was close.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Caller, AuthError> {
        let token = token.ok_or(AuthError::Missing)?;
        let mut found = None;
        for (node, t) in &self.by_node {
            if same(t.as_bytes(), token.as_bytes()) {
                found = Some(node.clone());
            }
        }
        let who = found.ok_or(AuthError::Unknown)?;
        Ok(match who.parse::<Identity>() {
            Ok(identity) if who.starts_with("spiffe://") => Caller::Workload { identity },
            _ => Caller::Node { node: who },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = NodeTokens::parse(
            "# lab\nnode-1 aaaaaaaaaaaaaaaa1\n\nnode-2 bbbbbbbbbbbbbbbb2\n\
             spiffe://cluster.local/ns/shop/sa/waypoint cccccccccccccccc3\n",
        )
        .unwrap();
        let node = |tok: &str| {
            t.authenticate(Some(tok))
                .unwrap()
                .node()
                .map(str::to_string)
        };
        assert_eq!(node("aaaaaaaaaaaaaaaa1").as_deref(), Some("node-1"));
        assert_eq!(node("bbbbbbbbbbbbbbbb2").as_deref(), Some("node-2"));
        let waypoint = t.authenticate(Some("cccccccccccccccc3")).unwrap();
        assert_eq!(
            waypoint.to_string(),
            "spiffe://cluster.local/ns/shop/sa/waypoint"
        );
        assert_eq!(waypoint.role(), Role::Waypoint);
        assert!(NodeTokens::parse("spiffe://cluster.local/ns/shop cccccccccccccccc3").is_err());
        assert_eq!(
            t.authenticate(Some("aaaaaaaaaaaaaaaa2")),
            Err(AuthError::Unknown)
        );
        assert_eq!(t.authenticate(Some("")), Err(AuthError::Unknown));
        assert_eq!(t.authenticate(None), Err(AuthError::Missing));
        assert!(
            NodeTokens::parse("node-1 short")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(NodeTokens::parse("node-1 aaaaaaaaaaaaaaaa1 extra").is_err());
    }
}
