//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A workload identity in Istio's SPIFFE form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error("identity {0:?} has an empty or invalid segment")]
    Segment(String),
}

// === impl Identity ===

impl Identity {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        };
        if ok(&id.trust_domain) && ok(&id.namespace) && ok(&id.service_account) {
            Ok(id)
        } else {
            Err(IdentityError::Segment(id.to_string()))
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Identity::new(*td, *ns, *sa),
            _ => Err(IdentityError::Shape(s.to_string())),
        }
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed SPIFFE URI round-trips through parse and display.
    #[test]
    fn round_trip() {
        let s = "spiffe://cluster.local/ns/shop/sa/reviews";
        let id: Identity = s.parse().unwrap();
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "reviews");
        assert_eq!(id.to_string(), s);
    }

    /// Every malformed shape is refused with the reason.
    #[test]
    fn refusals() {
        for (s, want) in [
            ("http://cluster.local/ns/a/sa/b", "spiffe://"),
            ("spiffe://cluster.local/ns/a", "not of the form"),
            ("spiffe://cluster.local/ns/a/sa/b/c", "not of the form"),
            ("spiffe://cluster.local/ns//sa/b", "empty or invalid"),
            ("spiffe://cluster.local/ns/a b/sa/b", "empty or invalid"),
            ("spiffe:///ns/a/sa/b", "empty or invalid"),
        ] {
            let err = s.parse::<Identity>().unwrap_err().to_string();
            assert!(err.contains(want), "{s}: {err}");
        }
    }
}
