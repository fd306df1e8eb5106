//! Consistent hashing (DestinationRule `loadBalancer.consistentHash`): a key
//! taken from each request (a header, a cookie, the client's address or a
//! query parameter) is hashed onto a table built over the endpoints, a ring
//! as Envoy's ring hash or a Maglev table. Requests with the same key reach
//! the same endpoint while the endpoints stay the same, and a change of
//! endpoints moves only a share of the keys. A request without the key goes
//! to a random endpoint, as in Envoy. A retry walks on from the key's place
//! to the next endpoint not tried yet.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use http::{HeaderMap, HeaderName, HeaderValue};
use weft_xds::proto::waypoint as pb;

use crate::state::Endpoint;

/// Istio's ring size when none is set (Envoy's default).
const RING_SIZE: u64 = 1024;
/// The largest ring built (Envoy allows 8M points; 1M, 16 MiB, is plenty
/// for an even spread over thousands of endpoints).
const RING_MAX: u64 = 1024 * 1024;
/// Envoy's Maglev table size when none is set.
const MAGLEV_SIZE: u64 = 65537;
/// Envoy's largest Maglev table (a prime).
const MAGLEV_MAX: u64 = 5_000_011;
/// Tables kept per policy: one per endpoint set in use (service ports,
/// endpoints ejected or not).
const TABLES_KEPT: usize = 4;

/// What a request is hashed by.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Header(HeaderName),
    Cookie {
        name: String,
        path: String,
        generate: bool,
        ttl_seconds: u64,
    },
    SourceIp,
    Query(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ring(u64),
    Maglev(u64),
}

/// A compiled `consistentHash`, with the tables built for it so far.
#[derive(Debug)]
pub struct HashPolicy {
    key: Key,
    kind: Kind,
    tables: Mutex<Vec<(Vec<SocketAddr>, Arc<Table>)>>,
}

/// A request's hash, and the cookie to set on its response when one was
/// made for it.
#[derive(Debug, Default)]
pub struct Keyed {
    pub hash: Option<u64>,
    pub set_cookie: Option<HeaderValue>,
}

impl HashPolicy {
    /// `None` when no key is set (the controller refuses that).
    pub fn compile(c: &pb::ConsistentHash) -> Option<HashPolicy> {
        use pb::consistent_hash::Key as K;
        let key = match c.key.as_ref()? {
            K::Header(h) => Key::Header(HeaderName::from_bytes(h.as_bytes()).ok()?),
            K::Cookie(k) => Key::Cookie {
                name: k.name.clone(),
                path: k.path.clone(),
                generate: k.generate,
                ttl_seconds: k.ttl_seconds,
            },
            K::SourceIp(_) => Key::SourceIp,
            K::QueryParameter(q) => Key::Query(q.clone()),
        };
        let kind = if c.maglev {
            let size = if c.table_size == 0 {
                MAGLEV_SIZE
            } else {
                c.table_size
            };
            // The table is only filled in full for a prime size.
            Kind::Maglev(next_prime(size.clamp(2, MAGLEV_MAX)))
        } else {
            let size = if c.table_size == 0 {
                RING_SIZE
            } else {
                c.table_size
            };
            Kind::Ring(size.min(RING_MAX))
        };
        Some(HashPolicy {
            key,
            kind,
            tables: Mutex::new(Vec::new()),
        })
    }

    /// The hash of a request, from its headers, its query string and the
    /// client's address. `roll` makes a new cookie's value.
    pub fn key(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        client: IpAddr,
        roll: u64,
    ) -> Keyed {
        match &self.key {
            Key::Header(name) => {
                let mut values: Vec<&[u8]> =
                    headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
                if values.is_empty() {
                    return Keyed::default();
                }
                values.sort_unstable();
                Keyed {
                    hash: Some(hash64(&values.join(&b","[..]))),
                    set_cookie: None,
                }
            }
            Key::Cookie {
                name,
                path,
                generate,
                ttl_seconds,
            } => {
                if let Some(v) = cookie(headers, name) {
                    return Keyed {
                        hash: Some(hash64(v.as_bytes())),
                        set_cookie: None,
                    };
                }
                if !generate {
                    return Keyed::default();
                }
                let value = format!("{roll:016x}");
                Keyed {
                    hash: Some(hash64(value.as_bytes())),
                    set_cookie: set_cookie(name, &value, path, *ttl_seconds),
                }
            }
            Key::SourceIp => Keyed {
                hash: Some(hash64(client.to_string().as_bytes())),
                set_cookie: None,
            },
            Key::Query(name) => Keyed {
                hash: query
                    .into_iter()
                    .flat_map(|q| q.split('&'))
                    .find_map(|kv| match kv.split_once('=') {
                        Some((k, v)) if k == name => Some(v),
                        None if kv == name => Some(""),
                        _ => None,
                    })
                    .map(|v| hash64(v.as_bytes())),
                set_cookie: None,
            },
        }
    }

    /// The hash of a TCP connection: only the client's address can key it.
    pub fn connection_key(&self, client: IpAddr) -> Option<u64> {
        (self.key == Key::SourceIp).then(|| hash64(client.to_string().as_bytes()))
    }

    /// The index in `endpoints` that `hash` selects, skipping those in
    /// `tried` while any other is left.
    pub fn pick(&self, endpoints: &[Endpoint], hash: u64, tried: &[SocketAddr]) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        let table = self.table(endpoints);
        let skip = |i: usize| tried.contains(&endpoints[i].addr);
        let all_tried = endpoints.iter().all(|e| tried.contains(&e.addr));
        Some(table.pick(hash, |i| !all_tried && skip(i)))
    }

    /// The table for this endpoint set, built once (outside the lock, so
    /// requests for other sets never wait on a build).
    fn table(&self, endpoints: &[Endpoint]) -> Arc<Table> {
        let same = |set: &[SocketAddr]| {
            set.len() == endpoints.len() && set.iter().zip(endpoints).all(|(a, e)| *a == e.addr)
        };
        {
            let tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((_, t)) = tables.iter().find(|(set, _)| same(set)) {
                return t.clone();
            }
        }
        let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
        let t = Arc::new(match self.kind {
            Kind::Ring(min) => Table::ring(&addrs, min),
            Kind::Maglev(size) => Table::maglev(&addrs, size),
        });
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        if !tables.iter().any(|(set, _)| same(set)) {
            if tables.len() >= TABLES_KEPT {
                tables.remove(0);
            }
            tables.push((addrs, t.clone()));
        }
        t
    }
}

/// A table over one endpoint set: endpoint indexes.
#[derive(Debug)]
enum Table {
    /// Points on the ring, sorted by hash.
    Ring(Vec<(u64, u32)>),
    Maglev(Vec<u32>),
}

impl Table {
    /// Every endpoint gets the same number of points, so that the ring has
    /// at least `min` of them.
    fn ring(endpoints: &[SocketAddr], min: u64) -> Table {
        let n = endpoints.len() as u64;
        let per = min.div_ceil(n).clamp(1, (RING_MAX / n.max(1)).max(1));
        let mut points = Vec::with_capacity((per * n) as usize);
        for (i, addr) in endpoints.iter().enumerate() {
            for k in 0..per {
                points.push((hash64(format!("{addr}_{k}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Table::Ring(points)
    }

    /// Maglev's population: each endpoint takes, in turn, the next free
    /// slot of its own permutation of the table until every slot is taken.
    /// `size` is prime, so each permutation visits every slot.
    fn maglev(endpoints: &[SocketAddr], size: u64) -> Table {
        const FREE: u32 = u32::MAX;
        let mut slots = vec![FREE; size as usize];
        let perms: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|a| {
                let name = a.to_string();
                let offset = hash64(name.as_bytes()) % size;
                let skip = hash64(format!("{name}#skip").as_bytes()) % (size - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; endpoints.len()];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % size;
                while slots[c as usize] != FREE {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % size;
                }
                slots[c as usize] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Table::Maglev(slots)
    }

    /// The endpoint at `hash`'s place, or the first one after it that
    /// `skip` does not refuse.
    fn pick(&self, hash: u64, skip: impl Fn(usize) -> bool) -> usize {
        match self {
            Table::Ring(points) => {
                let start = points.partition_point(|(h, _)| *h < hash);
                let at = |k: usize| points[(start + k) % points.len()].1 as usize;
                (0..points.len())
                    .map(at)
                    .find(|&i| !skip(i))
                    .unwrap_or_else(|| at(0))
            }
            Table::Maglev(slots) => {
                let start = (hash % slots.len() as u64) as usize;
                let at = |k: usize| slots[(start + k) % slots.len()] as usize;
                (0..slots.len())
                    .map(at)
                    .find(|&i| !skip(i))
                    .unwrap_or_else(|| at(0))
            }
        }
    }
}

/// A cookie's value from the request's Cookie headers, without the quotes
/// Envoy puts around the values it sets.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// A Set-Cookie value, as Envoy writes it for a hash cookie.
fn set_cookie(name: &str, value: &str, path: &str, ttl_seconds: u64) -> Option<HeaderValue> {
    let mut s = format!("{name}=\"{value}\"");
    if ttl_seconds > 0 {
        s.push_str(&format!("; Max-Age={ttl_seconds}"));
    }
    if !path.is_empty() {
        s.push_str(&format!("; Path={path}"));
    }
    s.push_str("; HttpOnly");
    HeaderValue::from_str(&s).ok()
}

/// FNV-1a, then MurmurHash3's finalizer so that near keys spread over the
/// whole range.
pub fn hash64(bytes: &[u8]) -> u64 {
    let mut h = weft_xds::fnv1a(bytes);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn next_prime(n: u64) -> u64 {
    (n..)
        .find(|&k| weft_xds::convert::is_prime(k))
        .unwrap_or(MAGLEV_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn endpoints(n: u8) -> Vec<Endpoint> {
        (1..=n).map(Endpoint::for_test).collect()
    }

    fn policy(key: pb::consistent_hash::Key, maglev: bool) -> HashPolicy {
        HashPolicy::compile(&pb::ConsistentHash {
            key: Some(key),
            maglev,
            table_size: 0,
        })
        .unwrap()
    }

    fn header(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-user", v.parse().unwrap());
        h
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// The same key always lands on the same endpoint; keys spread over all
    /// of them; removing one endpoint moves only the keys it held (and
    /// about its share), for both tables.
    #[test]
    fn same_key_same_endpoint_and_little_movement() {
        for maglev in [false, true] {
            let p = policy(pb::consistent_hash::Key::Header("x-user".into()), maglev);
            let eps = endpoints(4);
            let mut count = HashMap::new();
            let mut first = Vec::new();
            for u in 0..2000 {
                let k = p.key(&header(&format!("user-{u}")), None, CLIENT, 0);
                let i = p.pick(&eps, k.hash.unwrap(), &[]).unwrap();
                assert_eq!(p.pick(&eps, k.hash.unwrap(), &[]), Some(i));
                *count.entry(i).or_insert(0) += 1;
                first.push(i);
            }
            for i in 0..4 {
                let c = count.get(&i).copied().unwrap_or(0);
                assert!((300..=700).contains(&c), "maglev {maglev}: {count:?}");
            }
            // Endpoint 3 goes: its keys move, the others' stay.
            let fewer = &eps[..3];
            let mut moved = 0;
            for (u, &was) in first.iter().enumerate() {
                let k = p.key(&header(&format!("user-{u}")), None, CLIENT, 0);
                let now = p.pick(fewer, k.hash.unwrap(), &[]).unwrap();
                if was != 3 {
                    if now != was {
                        moved += 1;
                    }
                } else {
                    assert!(now < 3);
                }
            }
            // Both move a few keys of the others too: Maglev by its
            // population order, a ring because each endpoint's points grow
            // from 256 to 342 (as Envoy's do, to keep the ring's size).
            assert!(moved < 1500 * 15 / 100, "maglev {maglev}: {moved} moved");
        }
    }

    /// A retry walks on to an endpoint not tried, and back to the hashed
    /// one once every endpoint was tried.
    #[test]
    fn retries_skip_tried_endpoints() {
        for maglev in [false, true] {
            let p = policy(pb::consistent_hash::Key::SourceIp(true), maglev);
            let eps = endpoints(3);
            let h = p.key(&HeaderMap::new(), None, CLIENT, 0).hash.unwrap();
            let first = p.pick(&eps, h, &[]).unwrap();
            let second = p.pick(&eps, h, &[eps[first].addr]).unwrap();
            assert_ne!(first, second);
            let all: Vec<SocketAddr> = eps.iter().map(|e| e.addr).collect();
            assert_eq!(p.pick(&eps, h, &all), Some(first));
        }
    }

    #[test]
    fn keys_from_the_request() {
        use pb::consistent_hash::Key as K;
        let q = policy(K::QueryParameter("u".into()), false);
        let a = q.key(&HeaderMap::new(), Some("x=1&u=alice"), CLIENT, 0);
        let b = q.key(&HeaderMap::new(), Some("u=alice"), CLIENT, 0);
        assert_eq!(a.hash, b.hash);
        assert!(a.hash.is_some());
        assert_eq!(q.key(&HeaderMap::new(), Some("x=1"), CLIENT, 0).hash, None);
        let h = policy(K::Header("x-user".into()), false);
        assert_eq!(h.key(&HeaderMap::new(), None, CLIENT, 0).hash, None);
        let s = policy(K::SourceIp(true), false);
        assert_ne!(
            s.key(&HeaderMap::new(), None, CLIENT, 0).hash,
            s.key(&HeaderMap::new(), None, "10.0.0.1".parse().unwrap(), 0)
                .hash
        );
    }

    /// A cookie is set, as Envoy writes it, only when the request has none
    /// and the policy generates one; sent back (quoted or not), it hashes
    /// as it did when it was made.
    #[test]
    fn cookies() {
        let c = policy(
            pb::consistent_hash::Key::Cookie(pb::HashCookie {
                name: "user".into(),
                path: "/".into(),
                generate: true,
                ttl_seconds: 60,
            }),
            false,
        );
        let made = c.key(&HeaderMap::new(), None, CLIENT, 0xabc);
        assert_eq!(
            made.set_cookie.unwrap(),
            "user=\"0000000000000abc\"; Max-Age=60; Path=/; HttpOnly"
        );
        for sent in [
            "a=b; user=\"0000000000000abc\"",
            "user=0000000000000abc; c=d",
        ] {
            let mut h = HeaderMap::new();
            h.insert(http::header::COOKIE, sent.parse().unwrap());
            let k = c.key(&h, None, CLIENT, 1);
            assert_eq!(k.hash, made.hash, "{sent}");
            assert!(k.set_cookie.is_none());
        }
        let session = policy(
            pb::consistent_hash::Key::Cookie(pb::HashCookie {
                name: "s".into(),
                path: String::new(),
                generate: true,
                ttl_seconds: 0,
            }),
            false,
        );
        assert_eq!(
            session
                .key(&HeaderMap::new(), None, CLIENT, 1)
                .set_cookie
                .unwrap(),
            "s=\"0000000000000001\"; HttpOnly"
        );
        let never = policy(
            pb::consistent_hash::Key::Cookie(pb::HashCookie {
                name: "s".into(),
                ..Default::default()
            }),
            false,
        );
        let k = never.key(&HeaderMap::new(), None, CLIENT, 1);
        assert!(k.hash.is_none() && k.set_cookie.is_none());
    }

    #[test]
    fn maglev_sizes_are_prime() {
        assert_eq!(next_prime(65537), 65537);
        assert_eq!(next_prime(1000), 1009);
        let p = HashPolicy::compile(&pb::ConsistentHash {
            key: Some(pb::consistent_hash::Key::SourceIp(true)),
            maglev: true,
            table_size: 1000,
        })
        .unwrap();
        assert_eq!(p.kind, Kind::Maglev(1009));
    }
}
