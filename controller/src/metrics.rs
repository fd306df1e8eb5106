//! The controller's Prometheus metrics (`weft_controller_*`), served on the
//! monitoring port with `/debug/status`, the accepted/refused state of every
//! policy resource (what Kubernetes would show in status conditions).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// The xDS type's short name from `weft_xds::types` (`address`, `authorization`, …).
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub outcome: CertOutcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CertOutcome {
    signed,
    refused,
}

/// Every family, registered once.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub xds_clients: Gauge,
    pub xds_pushes: Family<TypeLabels, Counter>,
    pub xds_nacks: Family<TypeLabels, Counter>,
    pub certificates: Family<CertLabels, Counter>,
    pub publishes: Counter,
    pub resources: Family<TypeLabels, Gauge>,
    pub config_errors: Gauge,
    pub publish_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            xds_clients: Gauge::default(),
            xds_pushes: Family::default(),
            xds_nacks: Family::default(),
            certificates: Family::default(),
            publishes: Counter::default(),
            resources: Family::default(),
            config_errors: Gauge::default(),
            // 1 ms .. ~16 s.
            publish_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
        };
        m.registry.register(
            "weft_controller_xds_clients",
            "Delta ADS streams open now",
            m.xds_clients.clone(),
        );
        m.registry.register(
            "weft_controller_xds_pushes",
            "Delta ADS responses sent, by type",
            m.xds_pushes.clone(),
        );
        m.registry.register(
            "weft_controller_xds_nacks",
            "Delta ADS responses a client rejected, by type",
            m.xds_nacks.clone(),
        );
        m.registry.register(
            "weft_controller_certificates",
            "Certificate requests, by outcome",
            m.certificates.clone(),
        );
        m.registry.register(
            "weft_controller_publishes",
            "Config generations published",
            m.publishes.clone(),
        );
        m.registry.register(
            "weft_controller_resources",
            "xDS resources in the published config, by type",
            m.resources.clone(),
        );
        m.registry.register(
            "weft_controller_config_errors",
            "Resources refused (left out, or kept at their last accepted version) in the current config",
            m.config_errors.clone(),
        );
        m.registry.register(
            "weft_controller_publish_seconds",
            "Time from reading a change to the published config: read, translate, encode",
            m.publish_seconds.clone(),
        );
        m
    }
}

impl Metrics {
    /// OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        weft_runtime::metrics::encode(&self.registry)
    }

    pub fn push(&self, ty: &str) {
        if let Some(t) = xds_type(ty) {
            self.xds_pushes
                .get_or_create(&TypeLabels { r#type: t })
                .inc();
        }
    }

    pub fn nack(&self, ty: &str) {
        if let Some(t) = xds_type(ty) {
            self.xds_nacks
                .get_or_create(&TypeLabels { r#type: t })
                .inc();
        }
    }

    pub fn certificate(&self, outcome: CertOutcome) {
        self.certificates
            .get_or_create(&CertLabels { outcome })
            .inc();
    }
}

/// The metric label of a type URL, if it is a served type.
pub fn xds_type(ty: &str) -> Option<&'static str> {
    weft_xds::types::lookup(ty).map(|t| t.name)
}
