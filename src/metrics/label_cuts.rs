//! `flowmetrics_label_values_truncated_total{label}`: the cut counts kept by the
//! extraction stages ([`LabelCuts`]), written by prometheus-client's encoder. A label
//! appears with its first cut; before any, the family is left out.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;

use crate::flows::label_value::LabelCuts;

#[derive(Debug)]
pub struct LabelCutsFamily(pub Arc<LabelCuts>);

impl EncodeMetric for LabelCutsFamily {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut result = Ok(());
        self.0.for_each_cut(|label, count| {
            if result.is_ok() {
                result = encoder
                    .encode_family(&[("label", label)])
                    .and_then(|e| ConstCounter::new(count).encode(e));
            }
        });
        result
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
