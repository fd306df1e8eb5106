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

/// A hostile HTTP/2 peer: a real mTLS session with a valid mesh certificate,
/// then raw frames no well-behaved client sends.
pub mod hostile {
    use std::time::{Duration, Instant};

    use anyhow::Result;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;
    use weft_hbone::tls::{client_config, server_name};

    use super::Attempt;
    use crate::lab::LabPod;

    /// What the peer does after the HTTP/2 preface.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Attack {
        /// HEADERS (a CONNECT) then RST_STREAM, on stream after stream.
        RapidReset,
        /// One HEADERS without END_HEADERS, then CONTINUATION frames forever.
        ContinuationFlood,
        /// SETTINGS frames, never reading the ACKs.
        SettingsFlood,
        /// PING frames, never reading the answers.
        PingFlood,
        /// 100 CONNECT streams on one connection, held open (never reset).
        OpenStreams,
    }

    /// How an attack ended.
    #[derive(Debug)]
    pub struct Report {
        pub frames: u64,
        /// The server closed the connection (or stopped reading) before the time ran out.
        pub cut_off: bool,
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A CONNECT header block, HPACK without Huffman or indexing.
    fn connect_block(a: &Attempt) -> Vec<u8> {
        let mut b = Vec::new();
        let mut literal = |prefix: &[u8], value: &str| {
            b.extend_from_slice(prefix);
            b.push(value.len() as u8);
            b.extend_from_slice(value.as_bytes());
        };
        literal(&[0x02], "CONNECT"); // :method (static index 2)
        literal(&[0x01], &a.target.to_string()); // :authority (static index 1)
        if let Some(ip) = a.forwarded {
            literal(b"\x00\x09forwarded", &format!("for={ip}"));
        }
        b
    }

    /// Runs `attack` from inside `pod` against `a.server` for at most `time`.
    pub fn run(pod: &LabPod, a: Attempt, attack: Attack, time: Duration) -> Result<Report> {
        pod.netns.run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(flood(a, attack, time))
        })
    }

    async fn flood(a: Attempt, attack: Attack, time: Duration) -> Result<Report> {
        let cert = a
            .cert
            .clone()
            .ok_or_else(|| anyhow::anyhow!("a hostile peer needs a certificate"))?;
        let tls = client_config(&cert, &a.roots, vec![a.expect.clone()])?;
        let tcp = tokio::net::TcpStream::connect(a.server).await?;
        let mut tls = TlsConnector::from(tls)
            .connect(server_name(a.server.ip()), tcp)
            .await?;
        tls.write_all(PREFACE).await?;
        tls.write_all(&frame(4, 0, 0, &[])).await?;
        let block = connect_block(&a);
        let junk = vec![b'x'; 16 * 1024];
        let deadline = Instant::now() + time;
        let mut frames = 0u64;
        let mut stream = 1u32;
        let mut cut_off = false;
        if attack == Attack::ContinuationFlood {
            tls.write_all(&frame(1, 0, 1, &block)).await?;
        }
        let mut discard = vec![0u8; 64 * 1024];
        while Instant::now() < deadline {
            let batch: Vec<u8> = match attack {
                Attack::RapidReset => {
                    let mut b = frame(1, 0x4, stream, &block);
                    b.extend(frame(3, 0, stream, &8u32.to_be_bytes())); // CANCEL
                    stream = stream.wrapping_add(2);
                    b
                }
                Attack::ContinuationFlood => frame(9, 0, 1, &junk),
                Attack::SettingsFlood => frame(4, 0, 0, &[]),
                Attack::PingFlood => frame(6, 0, 0, &frames.to_be_bytes()),
                Attack::OpenStreams if stream < 200 => {
                    let b = frame(1, 0x4, stream, &block);
                    stream += 2;
                    b
                }
                Attack::OpenStreams => {
                    // Hold them: read (and drop) what the server sends.
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, tls.read(&mut discard)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => {
                            cut_off = true;
                            break;
                        }
                        _ => continue,
                    }
                }
            };
            let wrote = tokio::time::timeout(Duration::from_secs(2), tls.write_all(&batch)).await;
            match wrote {
                Ok(Ok(())) => frames += 1,
                // Closed, or the server stopped reading: either way cut off.
                _ => {
                    cut_off = true;
                    break;
                }
            }
            // Rapid reset reads what comes back (a real attacker does), so
            // the connection is not merely stalled by TCP.
            if attack == Attack::RapidReset {
                match tokio::time::timeout(Duration::from_millis(1), tls.read(&mut discard)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        cut_off = true;
                        break;
                    }
                    _ => {}
                }
            }
        }
        Ok(Report { frames, cut_off })
    }
}
