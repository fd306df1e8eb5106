//! CORS (VirtualService `corsPolicy`), as Envoy's CORS filter applies it
//! for Istio. A request with an `Origin` that the policy allows is a CORS
//! request: a preflight (`OPTIONS` with `Access-Control-Request-Method`)
//! is answered at the waypoint, 200 with the allowed methods, headers, max
//! age and credentials; any other has `Access-Control-Allow-Origin` (the
//! request's origin), credentials and exposed headers added to its answer.
//! A preflight from an origin not allowed goes upstream, or with
//! `unmatchedPreflights: IGNORE` is answered 200 with no CORS headers. A
//! request without an `Origin` is not touched. Pure: the proxy acts.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use weft_xds::proto::waypoint as pb;

use crate::route::{RouteError, StringMatch};

#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<StringMatch>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    allow_credentials: bool,
    ignore_unmatched: bool,
}

/// What the policy makes of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not a CORS request (no Origin, or one not allowed): passes as is.
    Pass,
    /// A CORS request: passes, and its answer gets these headers.
    Decorate(HeaderMap),
    /// A preflight the waypoint answers 200 with these headers.
    Answer(HeaderMap),
}

const ALLOW_ORIGIN: HeaderName = HeaderName::from_static("access-control-allow-origin");
const ALLOW_CREDENTIALS: HeaderName = HeaderName::from_static("access-control-allow-credentials");
const REQUEST_METHOD: HeaderName = HeaderName::from_static("access-control-request-method");

impl Cors {
    pub fn compile(c: &pb::Cors, at: &str) -> Result<Cors, RouteError> {
        let origins = c
            .allow_origins
            .iter()
            .enumerate()
            .map(|(i, m)| StringMatch::compile(m, &format!("{at}.allowOrigins[{i}]")))
            .collect::<Result<_, _>>()?;
        let list = |v: &[String], field: &str| -> Result<Option<HeaderValue>, RouteError> {
            if v.is_empty() {
                return Ok(None);
            }
            HeaderValue::from_str(&v.join(","))
                .map(Some)
                .map_err(|_| RouteError {
                    field: format!("{at}.{field}"),
                    message: "not a header value".into(),
                })
        };
        Ok(Cors {
            origins,
            allow_methods: list(&c.allow_methods, "allowMethods")?,
            allow_headers: list(&c.allow_headers, "allowHeaders")?,
            expose_headers: list(&c.expose_headers, "exposeHeaders")?,
            max_age: (c.max_age_seconds > 0).then(|| HeaderValue::from(c.max_age_seconds)),
            allow_credentials: c.allow_credentials,
            ignore_unmatched: c.ignore_unmatched_preflights,
        })
    }

    /// Whether `origin` is allowed: a match of it, or of `*` (Envoy's rule,
    /// so that `exact: "*"` allows any origin).
    fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|m| m.matches(origin) || m.matches("*"))
    }

    pub fn verdict(&self, method: &Method, headers: &HeaderMap) -> Verdict {
        let Some(origin) = headers.get(http::header::ORIGIN).filter(|o| !o.is_empty()) else {
            return Verdict::Pass;
        };
        let preflight =
            method == Method::OPTIONS && headers.get(REQUEST_METHOD).is_some_and(|m| !m.is_empty());
        if !origin.to_str().is_ok_and(|o| self.allows(o)) {
            return if preflight && self.ignore_unmatched {
                Verdict::Answer(HeaderMap::new())
            } else {
                Verdict::Pass
            };
        }
        let mut h = HeaderMap::new();
        h.insert(ALLOW_ORIGIN, origin.clone());
        if self.allow_credentials {
            h.insert(ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
        }
        if !preflight {
            if let Some(v) = &self.expose_headers {
                h.insert(http::header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
            }
            return Verdict::Decorate(h);
        }
        for (name, value) in [
            (
                http::header::ACCESS_CONTROL_ALLOW_METHODS,
                &self.allow_methods,
            ),
            (
                http::header::ACCESS_CONTROL_ALLOW_HEADERS,
                &self.allow_headers,
            ),
            (http::header::ACCESS_CONTROL_MAX_AGE, &self.max_age),
        ] {
            if let Some(v) = value {
                h.insert(name, v.clone());
            }
        }
        Verdict::Answer(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ignore_unmatched: bool) -> Cors {
        let exact = |s: &str| pb::StringMatch {
            kind: Some(pb::string_match::Kind::Exact(s.into())),
            ignore_case: false,
        };
        Cors::compile(
            &pb::Cors {
                allow_origins: vec![
                    exact("https://shop.example"),
                    pb::StringMatch {
                        kind: Some(pb::string_match::Kind::Regex(
                            r"https://.*\.test\.example".into(),
                        )),
                        ignore_case: false,
                    },
                ],
                allow_methods: vec!["GET".into(), "POST".into()],
                allow_headers: vec!["x-user".into()],
                expose_headers: vec!["x-trace".into()],
                max_age_seconds: 3600,
                allow_credentials: true,
                ignore_unmatched_preflights: ignore_unmatched,
            },
            "corsPolicy",
        )
        .unwrap()
    }

    fn req(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn preflights_and_requests() {
        let p = policy(false);
        let preflight = req(&[
            ("origin", "https://a.test.example"),
            ("access-control-request-method", "POST"),
        ]);
        let Verdict::Answer(h) = p.verdict(&Method::OPTIONS, &preflight) else {
            panic!()
        };
        assert_eq!(
            names(&h),
            [
                "access-control-allow-credentials: true",
                "access-control-allow-headers: x-user",
                "access-control-allow-methods: GET,POST",
                "access-control-allow-origin: https://a.test.example",
                "access-control-max-age: 3600",
            ]
        );
        // The same origin on a request: its answer is decorated.
        let Verdict::Decorate(h) =
            p.verdict(&Method::GET, &req(&[("origin", "https://shop.example")]))
        else {
            panic!()
        };
        assert_eq!(
            names(&h),
            [
                "access-control-allow-credentials: true",
                "access-control-allow-origin: https://shop.example",
                "access-control-expose-headers: x-trace",
            ]
        );
        // OPTIONS without Access-Control-Request-Method is no preflight.
        assert!(matches!(
            p.verdict(
                &Method::OPTIONS,
                &req(&[("origin", "https://shop.example")])
            ),
            Verdict::Decorate(_)
        ));
        // No origin, or one not allowed: untouched, and a preflight goes on.
        assert_eq!(p.verdict(&Method::GET, &HeaderMap::new()), Verdict::Pass);
        let evil = req(&[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ]);
        assert_eq!(p.verdict(&Method::OPTIONS, &evil), Verdict::Pass);
        assert_eq!(p.verdict(&Method::GET, &evil), Verdict::Pass);
        // unmatchedPreflights: IGNORE answers it, with no CORS headers.
        assert_eq!(
            policy(true).verdict(&Method::OPTIONS, &evil),
            Verdict::Answer(HeaderMap::new())
        );
    }

    #[test]
    fn a_star_allows_any_origin() {
        let p = Cors::compile(
            &pb::Cors {
                allow_origins: vec![pb::StringMatch {
                    kind: Some(pb::string_match::Kind::Exact("*".into())),
                    ignore_case: false,
                }],
                ..Default::default()
            },
            "corsPolicy",
        )
        .unwrap();
        let Verdict::Decorate(h) =
            p.verdict(&Method::GET, &req(&[("origin", "https://x.example")]))
        else {
            panic!()
        };
        assert_eq!(
            names(&h),
            ["access-control-allow-origin: https://x.example"]
        );
    }
}
