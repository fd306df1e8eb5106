//! An HBONE peer under the test's control: any certificate, any CONNECT target,
//! any `Forwarded` claim. The demo and the refusal tests play forged or lying
//! peers with it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use weft_api::Identity;
use weft_hbone::ca::IssuedCert;
use weft_hbone::client::{ConnectError, connect, handshake};
use weft_hbone::server::forwarded_header;
use weft_hbone::tls::{TrustRoots, client_config, server_name};

use crate::lab::LabPod;

/// What a CONNECT attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 200: the tunnel is open; carries what the far end sent back to `payload`.
    Open(Vec<u8>),
    /// The peer answered the CONNECT with this status.
    Refused(u16),
    /// TLS or HTTP/2 failed (the peer closed or alerted): the error text.
    Failed(String),
}

/// One CONNECT attempt.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// Where to dial (a pod's `ip:15008`).
    pub server: SocketAddr,
    /// The identity the server must prove.
    pub expect: Identity,
    /// Our certificate; `None` offers none.
    pub cert: Option<IssuedCert>,
    /// The roots we verify the server with.
    pub roots: TrustRoots,
    /// `:authority` of the CONNECT.
    pub target: SocketAddr,
    /// `Forwarded: for=` claim, if any.
    pub forwarded: Option<IpAddr>,
    /// Bytes to send once open (then half-close and read the reply).
    pub payload: Vec<u8>,
}

/// Runs `attempt` from inside `pod`.
pub fn attempt(pod: &LabPod, attempt: Attempt) -> Result<Outcome> {
    pod.netns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), run(attempt)).await })
            .context("HBONE attempt timed out")?
    })
}

async fn run(a: Attempt) -> Result<Outcome> {
    let tcp = tokio::net::TcpStream::connect(a.server).await?;
    let tls = match &a.cert {
        Some(cert) => client_config(cert, &a.roots, vec![a.expect.clone()])?,
        None => anonymous::config(),
    };
    let tls = match TlsConnector::from(tls)
        .connect(server_name(a.server.ip()), tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => return Ok(Outcome::Failed(format!("tls: {e}"))),
    };
    let (send, _closed) = match handshake(tls).await {
        Ok(s) => s,
        Err(e) => return Ok(Outcome::Failed(format!("h2: {e}"))),
    };
    let mut headers = HeaderMap::new();
    if let Some(ip) = a.forwarded {
        headers.insert("forwarded", HeaderValue::from_str(&forwarded_header(ip))?);
    }
    match connect(send, a.target, headers).await {
        Ok(mut stream) => {
            stream.write_all(&a.payload).await?;
            stream.shutdown().await?;
            let mut back = Vec::new();
            stream.read_to_end(&mut back).await?;
            Ok(Outcome::Open(back))
        }
        Err(ConnectError::Refused { status, .. }) => Ok(Outcome::Refused(status.as_u16())),
        Err(e) => Ok(Outcome::Failed(e.to_string())),
    }
}

/// A TLS client with no certificate that accepts any server: the probe for
/// "TLS without a client certificate".
mod anonymous {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct AcceptAny;

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    pub fn config() -> Arc<ClientConfig> {
        let mut cfg =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .expect("TLS 1.3 is supported by ring")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny))
                .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }
}
