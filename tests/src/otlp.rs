//! A small OpenTelemetry collector for the lab: OTLP/gRPC `Export` on an
//! h2c port in a pod, keeping every span it is sent with the resource it
//! came under.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Result;
use prost::Message;
use weft_xds::otlp;

use crate::apps::serve_h2_with;
use crate::lab::LabPod;

/// A span, with the attributes of the resource it was sent under.
pub type Received = (Vec<otlp::KeyValue>, otlp::Span);

/// The collector; stops when dropped.
#[derive(Debug)]
pub struct Collector {
    _stop: tokio::sync::oneshot::Sender<()>,
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    /// Every span received so far, with its resource's attributes.
    pub fn spans(&self) -> Vec<Received> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Serves OTLP/gRPC trace export on `port` in `pod`. A request that is not
/// an export, or does not decode, is answered `grpc-status` 12 or 3.
pub fn serve(pod: &LabPod, port: u16) -> Result<Collector> {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let kept = spans.clone();
    let stop = serve_h2_with(
        pod,
        port,
        Arc::new(move |path, body| {
            let mut trailers = http::HeaderMap::new();
            let status = if path != otlp::EXPORT_PATH {
                "12"
            } else {
                // One length-prefixed, uncompressed message.
                match body
                    .get(5..)
                    .filter(|_| body[0] == 0)
                    .and_then(|m| otlp::ExportTraceServiceRequest::decode(m).ok())
                {
                    Some(req) => {
                        let mut k = kept.lock().unwrap_or_else(PoisonError::into_inner);
                        for rs in req.resource_spans {
                            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
                            for ss in rs.scope_spans {
                                for s in ss.spans {
                                    k.push((resource.clone(), s));
                                }
                            }
                        }
                        "0"
                    }
                    None => "3",
                }
            };
            trailers.insert("grpc-status", http::HeaderValue::from_static(status));
            let reply = otlp::ExportTraceServiceResponse::default().encode_to_vec();
            let mut out = vec![0u8];
            out.extend_from_slice(&(reply.len() as u32).to_be_bytes());
            out.extend_from_slice(&reply);
            (out, trailers)
        }),
    )?;
    Ok(Collector { _stop: stop, spans })
}
