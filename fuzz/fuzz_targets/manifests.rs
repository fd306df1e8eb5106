//! What a user writes: Kubernetes YAML in the manifests directory, parsed and
//! translated (workloads, services, AuthorizationPolicy, PeerAuthentication)
//! as the controller does. Bad input is an error naming the resource, never a
//! panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_controller::translate::{self, Mesh};
use weft_controller::{Snapshot, manifests};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut snap = Snapshot::default();
    let _ = manifests::parse(text, "fuzz.yaml", &mut snap);
    let first = translate::translate(&snap, &Mesh::default(), None);
    // A second pass with history (the kept-version path) must not panic either.
    let _ = translate::translate(&snap, &Mesh::default(), Some(&first));
    let _ = weft_xds::convert::address_resources(&first.config);
});
