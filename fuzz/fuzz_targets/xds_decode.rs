//! What a control plane sends ztunnel: `istio.workload.Address` and
//! `istio.security.Authorization` resources, decoded and converted as
//! ztunnel does. A bad resource is refused, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_xds::convert;
use weft_xds::proto::{security, workload};

fuzz_target!(|data: &[u8]| {
    let (kind, bytes) = match data.split_first() {
        Some((k, rest)) => (*k, rest),
        None => return,
    };
    if kind % 2 == 0 {
        if let Ok(addr) = workload::Address::decode(bytes) {
            match addr.r#type {
                Some(workload::address::Type::Workload(w)) => {
                    let _ = convert::workload_from_proto("fuzz", w);
                }
                Some(workload::address::Type::Service(s)) => {
                    let _ = convert::service_from_proto("fuzz", s);
                }
                None => {}
            }
        }
    } else if let Ok(auth) = security::Authorization::decode(bytes)
        && let Ok((policy, _)) = convert::authorization_from_proto("fuzz", auth)
    {
        // What ztunnel accepted, the controller can send again.
        let (_, msg) = convert::authorization_to_proto(&policy);
        let back = convert::authorization_from_proto("fuzz", msg).map(|(p, _)| p);
        assert_eq!(back.ok(), Some(policy));
    }
});
