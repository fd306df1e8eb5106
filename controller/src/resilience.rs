//! VirtualService `retries` and `fault`, checked and translated for the
//! waypoint with Istio's meaning:
//! - `retries` unset: Istio's default policy (the waypoint applies it when
//!   the rule carries none); `attempts` 0 or unset: no retries; `retryOn`
//!   lists Envoy's conditions, and a number in it is a retriable status
//!   code (`retriable-status-codes` is then implied).
//! - `fault`: a delay and/or an abort, each for a percentage of requests
//!   (none when the percentage is unset); a rule with faults has no retries
//!   and no timeout.

use serde::{Deserialize, Serialize};
use weft_xds::proto::waypoint as pb;

use crate::routes::duration_ms;

/// `HTTPRetry`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<String>,
}

/// `HTTPFaultInjection`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FaultDelay {
    pub fixed_delay: Option<String>,
    pub exponential_delay: Option<String>,
    pub percentage: Option<Percent>,
    /// Deprecated integer form of `percentage`.
    pub percent: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct FaultAbort {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub http2_error: Option<String>,
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Percent {
    pub value: f64,
}

/// `ConnectionPoolSettings`: Envoy's circuit breakers for one destination.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectionPool {
    pub tcp: Option<TcpPool>,
    pub http: Option<HttpPool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpPool {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
    /// Not applied yet: the status lists them.
    #[serde(flatten)]
    pub rest: std::collections::BTreeMap<String, serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpPool {
    pub http1_max_pending_requests: Option<i64>,
    pub http2_max_requests: Option<i64>,
    pub max_requests_per_connection: Option<i64>,
    pub max_retries: Option<i64>,
    pub idle_timeout: Option<String>,
    #[serde(flatten)]
    pub rest: std::collections::BTreeMap<String, serde_yaml::Value>,
}

/// `connectionPool` at `at`, and the fields it has that are not applied
/// yet (for the status: never silently).
pub fn connection_pool(
    cp: &ConnectionPool,
    at: &str,
) -> Result<(pb::ConnectionPool, Vec<String>), String> {
    let count = |v: Option<i64>, field: &str| -> Result<u32, String> {
        match v {
            None => Ok(0),
            Some(n) if n >= 1 => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
            Some(n) => Err(format!("{at}.{field}: {n} must be 1 or more")),
        }
    };
    let ms = |v: &Option<String>, field: &str| -> Result<u64, String> {
        match v {
            None => Ok(0),
            Some(t) => duration_ms(t)
                .filter(|ms| *ms >= 1)
                .ok_or_else(|| format!("{at}.{field}: {t:?} is not a duration of 1ms or more")),
        }
    };
    let mut out = pb::ConnectionPool::default();
    let mut not_applied = Vec::new();
    if let Some(t) = &cp.tcp {
        out.max_connections = count(t.max_connections, "tcp.maxConnections")?;
        out.connect_timeout_ms = ms(&t.connect_timeout, "tcp.connectTimeout")?;
        not_applied.extend(t.rest.keys().map(|k| format!("{at}.tcp.{k}")));
    }
    if let Some(h) = &cp.http {
        out.http1_max_pending_requests =
            count(h.http1_max_pending_requests, "http.http1MaxPendingRequests")?;
        out.http2_max_requests = count(h.http2_max_requests, "http.http2MaxRequests")?;
        out.max_requests_per_connection = count(
            h.max_requests_per_connection,
            "http.maxRequestsPerConnection",
        )?;
        // To allow no retries at all, a route sets `retries.attempts: 0`.
        out.max_retries = count(h.max_retries, "http.maxRetries")?;
        out.idle_timeout_ms = ms(&h.idle_timeout, "http.idleTimeout")?;
        not_applied.extend(h.rest.keys().map(|k| format!("{at}.http.{k}")));
    }
    Ok((out, not_applied))
}

/// `OutlierDetection`: Envoy's consecutive-error ejection.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<i64>,
    pub consecutive_gateway_errors: Option<i64>,
    pub interval: Option<String>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
    /// Not applied yet: the status lists them.
    #[serde(flatten)]
    pub rest: std::collections::BTreeMap<String, serde_yaml::Value>,
}

/// `outlierDetection` at `at`, with Istio's defaults (5 consecutive 5xx,
/// 30 s, 10%), and the fields not applied yet.
pub fn outlier_detection(
    od: &OutlierDetection,
    at: &str,
) -> Result<(pb::OutlierDetection, Vec<String>), String> {
    let count = |v: Option<i64>, field: &str, default: u32| -> Result<u32, String> {
        match v {
            None => Ok(default),
            Some(n) if n >= 0 => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
            Some(n) => Err(format!("{at}.{field}: {n} must not be negative")),
        }
    };
    let base = match &od.base_ejection_time {
        None => 30_000,
        Some(t) => duration_ms(t).filter(|ms| *ms >= 1).ok_or_else(|| {
            format!("{at}.baseEjectionTime: {t:?} is not a duration of 1ms or more")
        })?,
    };
    if let Some(t) = &od.interval {
        duration_ms(t)
            .filter(|ms| *ms >= 1)
            .ok_or_else(|| format!("{at}.interval: {t:?} is not a duration of 1ms or more"))?;
    }
    let max = count(od.max_ejection_percent, "maxEjectionPercent", 10)?;
    if max > 100 {
        return Err(format!("{at}.maxEjectionPercent: {max} is over 100"));
    }
    Ok((
        pb::OutlierDetection {
            consecutive_5xx_errors: count(od.consecutive_5xx_errors, "consecutive5xxErrors", 5)?,
            consecutive_gateway_errors: count(
                od.consecutive_gateway_errors,
                "consecutiveGatewayErrors",
                0,
            )?,
            base_ejection_time_ms: base,
            max_ejection_percent: max,
        },
        od.rest.keys().map(|k| format!("{at}.{k}")).collect(),
    ))
}

/// The conditions Envoy's `retry_on` (and `retry-grpc-on`) take that the
/// waypoint evaluates.
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "envoy-ratelimited",
    "retriable-headers",
    "http3-post-connect-failure",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// gRPC status codes by the names Istio's `grpcStatus` takes.
const GRPC_CODES: &[(&str, u32)] = &[
    ("OK", 0),
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

/// `retries` at `at`, as the waypoint applies it.
pub fn retries(r: &HttpRetry, at: &str) -> Result<pb::RetryPolicy, String> {
    let attempts = r.attempts.unwrap_or(0);
    if attempts < 0 {
        return Err(format!("{at}.attempts: must not be negative"));
    }
    let attempts = u32::try_from(attempts.min(100)).unwrap_or(100);
    let mut out = pb::RetryPolicy {
        attempts,
        allow_previous_hosts: r.retry_ignore_previous_hosts == Some(false),
        ..pb::RetryPolicy::default()
    };
    if let Some(t) = &r.per_try_timeout {
        out.per_try_timeout_ms = duration_ms(t)
            .filter(|ms| *ms >= 1)
            .ok_or_else(|| format!("{at}.perTryTimeout: {t:?} is not a duration of 1ms or more"))?;
    }
    if let Some(b) = &r.backoff {
        out.backoff_base_ms = duration_ms(b)
            .filter(|ms| *ms >= 1)
            .ok_or_else(|| format!("{at}.backoff: {b:?} is not a duration of 1ms or more"))?;
    }
    match r
        .retry_on
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        // Istio's default conditions, with its default code.
        None => {
            out.retry_on = DEFAULT_RETRY_ON.iter().map(|s| s.to_string()).collect();
            out.retriable_status_codes = vec![503];
        }
        Some(list) => {
            for c in list.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if let Ok(code) = c.parse::<u32>() {
                    if !(100..=599).contains(&code) {
                        return Err(format!("{at}.retryOn: {code} is not an HTTP status"));
                    }
                    out.retriable_status_codes.push(code);
                } else if RETRY_ON.contains(&c) {
                    out.retry_on.push(c.to_string());
                } else {
                    return Err(format!(
                        "{at}.retryOn: unknown condition {c:?} (known: {})",
                        RETRY_ON.join(", ")
                    ));
                }
            }
            if !out.retriable_status_codes.is_empty()
                && !out.retry_on.iter().any(|c| c == "retriable-status-codes")
            {
                out.retry_on.push("retriable-status-codes".into());
            }
        }
    }
    Ok(out)
}

/// Istio's default `retryOn`.
pub const DEFAULT_RETRY_ON: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
];

fn percent(p: Option<&Percent>, legacy: Option<i64>, at: &str) -> Result<f64, String> {
    let v = match (p, legacy) {
        (Some(p), _) => p.value,
        (None, Some(i)) => i as f64,
        // As Istio: unset, no request is affected.
        (None, None) => 0.0,
    };
    if !(0.0..=100.0).contains(&v) || v.is_nan() {
        return Err(format!("{at}.percentage.value: {v} is not within [0, 100]"));
    }
    Ok(v)
}

/// `fault` at `at`, as the waypoint injects it.
pub fn fault(f: &HttpFault, at: &str) -> Result<pb::Fault, String> {
    if f.delay.is_none() && f.abort.is_none() {
        return Err(format!("{at}: delay or abort is required"));
    }
    let mut out = pb::Fault::default();
    if let Some(d) = &f.delay {
        let at = format!("{at}.delay");
        if d.exponential_delay.is_some() {
            return Err(format!(
                "{at}.exponentialDelay: not supported; use fixedDelay"
            ));
        }
        let t = d
            .fixed_delay
            .as_deref()
            .ok_or_else(|| format!("{at}.fixedDelay: required"))?;
        out.delay_ms = duration_ms(t)
            .filter(|ms| *ms >= 1)
            .ok_or_else(|| format!("{at}.fixedDelay: {t:?} is not a duration of 1ms or more"))?;
        out.delay_percent = percent(d.percentage.as_ref(), d.percent, &at)?;
    }
    if let Some(a) = &f.abort {
        let at = format!("{at}.abort");
        match (
            a.http_status,
            a.grpc_status.as_deref(),
            a.http2_error.as_deref(),
        ) {
            (Some(s), None, None) => {
                if !(200..=599).contains(&s) {
                    return Err(format!("{at}.httpStatus: {s} is not within [200, 599]"));
                }
                out.abort_http_status = s as u32;
            }
            (None, Some(g), None) => {
                let code = GRPC_CODES
                    .iter()
                    .find(|(n, _)| *n == g)
                    .map(|(_, c)| *c)
                    .ok_or_else(|| format!("{at}.grpcStatus: unknown gRPC status {g:?}"))?;
                out.grpc_abort = true;
                out.abort_grpc_status = code;
            }
            (None, None, Some(_)) => {
                return Err(format!(
                    "{at}.http2Error: not supported; use httpStatus or grpcStatus"
                ));
            }
            _ => {
                return Err(format!(
                    "{at}: exactly one of httpStatus, grpcStatus or http2Error is required"
                ));
            }
        }
        out.abort_percent = percent(a.percentage.as_ref(), None, &at)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(yaml: &str) -> Result<pb::RetryPolicy, String> {
        retries(&serde_yaml::from_str(yaml).unwrap(), "r")
    }

    fn inject(yaml: &str) -> Result<pb::Fault, String> {
        fault(&serde_yaml::from_str(yaml).unwrap(), "f")
    }

    #[test]
    fn retry_policies() {
        let p = retry("{attempts: 3, perTryTimeout: 2s}").unwrap();
        assert_eq!((p.attempts, p.per_try_timeout_ms), (3, 2000));
        assert_eq!(p.retry_on, DEFAULT_RETRY_ON, "Istio's default conditions");
        assert_eq!(p.retriable_status_codes, [503]);
        assert!(
            retry("{attempts: 1, retryIgnorePreviousHosts: false}")
                .unwrap()
                .allow_previous_hosts
        );
        assert!(!retry("{attempts: 1}").unwrap().allow_previous_hosts);
        let p = retry("{attempts: 2, retryOn: 'gateway-error,connect-failure,409'}").unwrap();
        assert_eq!(
            p.retry_on,
            ["gateway-error", "connect-failure", "retriable-status-codes"]
        );
        assert_eq!(p.retriable_status_codes, [409]);
        assert_eq!(
            retry("{perTryTimeout: 1s}").unwrap().attempts,
            0,
            "no attempts: none"
        );
        for (yaml, want) in [
            ("{attempts: -1}", "r.attempts: must not be negative"),
            (
                "{attempts: 1, retryOn: '5xx,bogus'}",
                "r.retryOn: unknown condition \"bogus\"",
            ),
            (
                "{attempts: 1, retryOn: '999'}",
                "r.retryOn: 999 is not an HTTP status",
            ),
            ("{attempts: 1, perTryTimeout: 0s}", "r.perTryTimeout"),
        ] {
            let e = retry(yaml).unwrap_err();
            assert!(e.starts_with(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn faults() {
        let f = inject("{delay: {fixedDelay: 7s, percentage: {value: 12.5}}, abort: {httpStatus: 500, percentage: {value: 10}}}").unwrap();
        assert_eq!((f.delay_ms, f.delay_percent), (7000, 12.5));
        assert_eq!((f.abort_http_status, f.abort_percent), (500, 10.0));
        let f = inject("{abort: {grpcStatus: UNAVAILABLE}}").unwrap();
        assert!(f.grpc_abort);
        assert_eq!(
            (f.abort_grpc_status, f.abort_percent),
            (14, 0.0),
            "unset percentage: none"
        );
        assert_eq!(
            inject("{delay: {fixedDelay: 1s, percent: 50}}")
                .unwrap()
                .delay_percent,
            50.0
        );
        for (yaml, want) in [
            ("{}", "f: delay or abort is required"),
            (
                "{delay: {percentage: {value: 5}}}",
                "f.delay.fixedDelay: required",
            ),
            (
                "{delay: {fixedDelay: 1s, percentage: {value: 101}}}",
                "f.delay.percentage.value",
            ),
            ("{abort: {httpStatus: 99}}", "f.abort.httpStatus: 99"),
            (
                "{abort: {grpcStatus: NOPE}}",
                "f.abort.grpcStatus: unknown gRPC status",
            ),
            (
                "{abort: {httpStatus: 500, grpcStatus: OK}}",
                "f.abort: exactly one",
            ),
            (
                "{abort: {http2Error: REFUSED_STREAM}}",
                "f.abort.http2Error: not supported",
            ),
        ] {
            let e = inject(yaml).unwrap_err();
            assert!(e.starts_with(want), "{yaml}: {e}");
        }
    }
}
