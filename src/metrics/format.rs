//! The exposition formats `/metrics` can answer in.

/// What a scrape is answered in (one encode is shared per format, see
/// `admin::scrape`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpositionFormat {
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
}

impl ExpositionFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            ExpositionFormat::OpenMetrics => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
        }
    }
}
