//! DestinationRule `trafficPolicy.loadBalancer`, checked and translated for
//! the waypoint with Istio's meaning:
//! - `simple`: ROUND_ROBIN, LEAST_REQUEST (LEAST_CONN, its old name),
//!   RANDOM; unset: least request.
//! - `consistentHash`: exactly one key (`httpHeaderName`, `httpCookie`,
//!   `useSourceIp`, `httpQueryParameterName`) on a ring (`ringHash`, or the
//!   deprecated `minimumRingSize`; the default, 1024 points) or a Maglev
//!   table (`maglev.tableSize`, a prime). An `httpCookie` with a `ttl` is
//!   set on responses to requests without it; `ttl: 0s` makes it a session
//!   cookie.
//! - `localityLbSetting` and `warmup`: accepted and named in the status as
//!   not applied yet.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use weft_xds::proto::waypoint as pb;

use crate::routes::duration_ms;

/// `LoadBalancerSettings`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancerSettings {
    pub simple: Option<String>,
    pub consistent_hash: Option<ConsistentHash>,
    /// Fields the schema has and the waypoint does not apply yet, and
    /// unknown ones (refused).
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_yaml::Value>,
}

/// `LoadBalancerSettings.ConsistentHashLB`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ConsistentHash {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<RingHash>,
    pub maglev: Option<Maglev>,
    /// Deprecated form of `ringHash.minimumRingSize`.
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpCookie {
    pub name: String,
    pub path: Option<String>,
    pub ttl: Option<String>,
    pub attributes: Option<serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RingHash {
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Maglev {
    pub table_size: Option<u64>,
}

/// Envoy's largest Maglev table (a prime).
const MAGLEV_MAX: u64 = 5_000_011;
/// Envoy's largest ring.
const RING_MAX: u64 = 8_388_608;

/// Fields of `LoadBalancerSettings` accepted but not applied yet.
const NOT_APPLIED: &[&str] = &["localityLbSetting", "warmupDurationSecs", "warmup"];

/// The balance that `lb` (at `at`) asks for: a simple one, or a consistent
/// hash. What it sets that is not applied yet goes to `not_applied`.
pub fn load_balancer(
    lb: Option<&LoadBalancerSettings>,
    at: &str,
    not_applied: &mut Vec<String>,
) -> Result<(i32, Option<pb::ConsistentHash>), String> {
    let Some(lb) = lb else {
        return Ok((pb::LoadBalancer::Unspecified as i32, None));
    };
    let at = format!("{at}.loadBalancer");
    for k in lb.rest.keys() {
        if NOT_APPLIED.contains(&k.as_str()) {
            not_applied.push(format!("{at}.{k}"));
        } else {
            return Err(format!("{at}.{k}: unknown field"));
        }
    }
    let simple = match lb.simple.as_deref() {
        None | Some("UNSPECIFIED") => pb::LoadBalancer::Unspecified,
        Some("ROUND_ROBIN") => pb::LoadBalancer::RoundRobin,
        Some("LEAST_REQUEST") | Some("LEAST_CONN") => pb::LoadBalancer::LeastRequest,
        Some("RANDOM") => pb::LoadBalancer::Random,
        Some("PASSTHROUGH") => {
            return Err(format!(
                "{at}.simple: PASSTHROUGH is not supported by Weft's waypoint"
            ));
        }
        Some(other) => {
            return Err(format!(
                "{at}.simple: {other:?} is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM"
            ));
        }
    };
    let hash = match &lb.consistent_hash {
        None => None,
        Some(_) if lb.simple.is_some() => {
            return Err(format!(
                "{at}: simple and consistentHash are exclusive; set one"
            ));
        }
        Some(c) => Some(consistent_hash(c, &format!("{at}.consistentHash"))?),
    };
    Ok((simple as i32, hash))
}

fn consistent_hash(c: &ConsistentHash, at: &str) -> Result<pb::ConsistentHash, String> {
    use pb::consistent_hash::Key;
    let mut keys = Vec::new();
    if let Some(h) = &c.http_header_name {
        if h.is_empty() || !h.bytes().all(is_token_byte) {
            return Err(format!("{at}.httpHeaderName: {h:?} is not a header name"));
        }
        keys.push(Key::Header(h.to_ascii_lowercase()));
    }
    if let Some(k) = &c.http_cookie {
        if k.name.is_empty() || !k.name.bytes().all(is_token_byte) {
            return Err(format!(
                "{at}.httpCookie.name: {:?} is not a cookie name",
                k.name
            ));
        }
        if k.attributes.is_some() {
            return Err(format!(
                "{at}.httpCookie.attributes: not supported by Weft's waypoint yet"
            ));
        }
        let ttl_seconds = match &k.ttl {
            None => None,
            Some(t) => Some(
                duration_ms(t)
                    .ok_or_else(|| format!("{at}.httpCookie.ttl: {t:?} is not a duration"))?
                    .div_ceil(1000),
            ),
        };
        let path = k.path.clone().unwrap_or_default();
        if !path.bytes().all(|b| b.is_ascii_graphic() && b != b';') {
            return Err(format!(
                "{at}.httpCookie.path: {path:?} is not a cookie path"
            ));
        }
        keys.push(Key::Cookie(pb::HashCookie {
            name: k.name.clone(),
            path,
            generate: ttl_seconds.is_some(),
            ttl_seconds: ttl_seconds.unwrap_or(0),
        }));
    }
    if c.use_source_ip == Some(true) {
        keys.push(Key::SourceIp(true));
    }
    if let Some(q) = &c.http_query_parameter_name {
        if q.is_empty() {
            return Err(format!("{at}.httpQueryParameterName: empty"));
        }
        keys.push(Key::QueryParameter(q.clone()));
    }
    if keys.len() != 1 {
        return Err(format!(
            "{at}: set exactly one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName"
        ));
    }
    let ring = c
        .ring_hash
        .as_ref()
        .and_then(|r| r.minimum_ring_size)
        .or(c.minimum_ring_size);
    let (maglev, table_size) = match (&c.maglev, &c.ring_hash) {
        (Some(_), Some(_)) => {
            return Err(format!("{at}: ringHash and maglev are exclusive; set one"));
        }
        (Some(m), None) => {
            let size = m.table_size.unwrap_or(0);
            if size > MAGLEV_MAX {
                return Err(format!(
                    "{at}.maglev.tableSize: {size} is over Envoy's limit of {MAGLEV_MAX}"
                ));
            }
            if size != 0 && !weft_xds::convert::is_prime(size) {
                return Err(format!(
                    "{at}.maglev.tableSize: {size} is not a prime number"
                ));
            }
            (true, size)
        }
        (None, _) => {
            let size = ring.unwrap_or(0);
            if size > RING_MAX {
                return Err(format!(
                    "{at}.ringHash.minimumRingSize: {size} is over Envoy's limit of {RING_MAX}"
                ));
            }
            (false, size)
        }
    };
    Ok(pb::ConsistentHash {
        key: keys.pop(),
        maglev,
        table_size,
    })
}

/// RFC 9110's token characters: a header name, a cookie name.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lb(yaml: &str) -> Result<(i32, Option<pb::ConsistentHash>, Vec<String>), String> {
        let lb: LoadBalancerSettings = serde_yaml::from_str(yaml).unwrap();
        let mut not_applied = Vec::new();
        let (s, h) = load_balancer(Some(&lb), "spec.trafficPolicy", &mut not_applied)?;
        Ok((s, h, not_applied))
    }

    #[test]
    fn keys() {
        use pb::consistent_hash::Key;
        let (_, h, _) = lb("consistentHash: {httpHeaderName: X-User}").unwrap();
        assert_eq!(
            h,
            Some(pb::ConsistentHash {
                key: Some(Key::Header("x-user".into())),
                maglev: false,
                table_size: 0,
            })
        );
        let (_, h, _) =
            lb("consistentHash: {httpCookie: {name: user, path: /, ttl: 60s}, maglev: {}}")
                .unwrap();
        let h = h.unwrap();
        assert!(h.maglev);
        assert_eq!(
            h.key,
            Some(Key::Cookie(pb::HashCookie {
                name: "user".into(),
                path: "/".into(),
                generate: true,
                ttl_seconds: 60,
            }))
        );
        // No ttl: a cookie is hashed but never set.
        let (_, h, _) = lb("consistentHash: {httpCookie: {name: user}}").unwrap();
        assert!(matches!(
            h.unwrap().key,
            Some(Key::Cookie(pb::HashCookie {
                generate: false,
                ..
            }))
        ));
        let (_, h, _) = lb("consistentHash: {useSourceIp: true, minimumRingSize: 4096}").unwrap();
        assert_eq!(h.as_ref().unwrap().key, Some(Key::SourceIp(true)));
        assert_eq!(h.unwrap().table_size, 4096);
        let (_, h, _) =
            lb("consistentHash: {httpQueryParameterName: u, ringHash: {minimumRingSize: 64}}")
                .unwrap();
        assert_eq!(h.unwrap().table_size, 64);
    }

    /// Each refusal names its field.
    #[test]
    fn refusals() {
        for (yaml, field) in [
            ("consistentHash: {}", "consistentHash: set exactly one"),
            (
                "consistentHash: {httpHeaderName: a, useSourceIp: true}",
                "consistentHash: set exactly one",
            ),
            ("consistentHash: {httpHeaderName: 'a b'}", "httpHeaderName"),
            (
                "consistentHash: {httpCookie: {name: ''}}",
                "httpCookie.name",
            ),
            (
                "consistentHash: {httpCookie: {name: a, ttl: soon}}",
                "httpCookie.ttl",
            ),
            (
                "consistentHash: {useSourceIp: true, maglev: {tableSize: 1000}}",
                "maglev.tableSize: 1000 is not a prime",
            ),
            (
                "consistentHash: {useSourceIp: true, maglev: {}, ringHash: {}}",
                "exclusive",
            ),
            (
                "consistentHash: {useSourceIp: true, maglev: {tableSize: 18446744073709551557}}",
                "over Envoy's limit",
            ),
            (
                "consistentHash: {useSourceIp: true, ringHash: {minimumRingSize: 100000000}}",
                "over Envoy's limit",
            ),
            (
                "{simple: RANDOM, consistentHash: {useSourceIp: true}}",
                "simple and consistentHash",
            ),
            ("{simple: FASTEST}", "loadBalancer.simple"),
            ("{sticky: true}", "loadBalancer.sticky: unknown field"),
        ] {
            let err = lb(yaml).unwrap_err();
            assert!(err.contains(field), "{yaml}: {err}");
        }
        let (_, _, not_applied) =
            lb("{simple: ROUND_ROBIN, localityLbSetting: {enabled: true}}").unwrap();
        assert_eq!(
            not_applied,
            ["spec.trafficPolicy.loadBalancer.localityLbSetting"]
        );
    }
}
