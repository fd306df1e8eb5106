//! What an HBONE peer controls in a CONNECT: the `Forwarded` header, the
//! `:authority`, and the identities in its certificate (URI SAN) and CSR.
//! None of it may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(ip) = weft_hbone::server::parse_forwarded_for(text) {
        // What we write for an address we read back.
        let again = weft_hbone::server::forwarded_header(ip);
        assert_eq!(weft_hbone::server::parse_forwarded_for(&again), Some(ip));
    }
    let _ = text.parse::<std::net::SocketAddr>();
    if let Ok(id) = text.parse::<weft_api::Identity>() {
        // An identity that parses prints as what parses to it again.
        assert_eq!(id.to_string().parse::<weft_api::Identity>().ok(), Some(id));
    }
    let _ = weft_hbone::ca::VerifiedCsr::from_pem(text);
});
