//! OTLP/JSON enum values by name. The protobuf JSON mapping allows an enum as its
//! number or its name (`"kind": "SPAN_KIND_INTERNAL"`); opentelemetry-proto's serde
//! types take only numbers, so names are turned into numbers first.

use opentelemetry_proto::tonic::logs::v1::SeverityNumber;
use opentelemetry_proto::tonic::metrics::v1::AggregationTemporality;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Parses an OTLP/JSON body. Bodies with numeric enums (the usual case) are parsed once;
/// only a body the typed parse refuses is read again as a JSON tree, with enum names
/// replaced by their numbers.
pub fn from_slice<R: DeserializeOwned>(body: &[u8]) -> Result<R, serde_json::Error> {
    let err = match serde_json::from_slice(body) {
        Ok(request) => return Ok(request),
        Err(e) => e,
    };
    if !err.is_data() {
        return Err(err);
    }
    let Ok(mut tree) = serde_json::from_slice::<Value>(body) else {
        return Err(err);
    };
    if !numbers_for_names(&mut tree) {
        return Err(err);
    }
    // The first error names a line and column; the tree's would not.
    serde_json::from_value(tree).map_err(|_| err)
}

/// The number of an enum name, for each enum field of the trace, logs and metrics JSON
/// mapping (the field names are unique to those enums in OTLP).
fn enum_number(field: &str, name: &str) -> Option<i32> {
    match field {
        "kind" => SpanKind::from_str_name(name).map(|v| v as i32),
        "code" => StatusCode::from_str_name(name).map(|v| v as i32),
        "severityNumber" => SeverityNumber::from_str_name(name).map(|v| v as i32),
        "aggregationTemporality" => AggregationTemporality::from_str_name(name).map(|v| v as i32),
        _ => None,
    }
}

/// Replaces enum names in place; true if any was replaced. Depth is bounded by
/// serde_json's recursion limit on the parse that built the tree.
pub fn numbers_for_names(value: &mut Value) -> bool {
    match value {
        Value::Object(map) => {
            let mut changed = false;
            for (field, v) in map.iter_mut() {
                if let Value::String(name) = v {
                    if let Some(n) = enum_number(field, name) {
                        *v = Value::from(n);
                        changed = true;
                    }
                } else {
                    changed |= numbers_for_names(v);
                }
            }
            changed
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, v| numbers_for_names(v) | changed),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    #[test]
    fn span_kind_and_status_code_by_name() {
        let body = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"a",
            "kind":"SPAN_KIND_INTERNAL","status":{"code":"STATUS_CODE_ERROR"}},
            {"name":"b","kind":3}]}]}]}"#;
        let r: ExportTraceServiceRequest = from_slice(body).unwrap();
        let spans = &r.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans[0].kind, SpanKind::Internal as i32);
        assert_eq!(
            spans[0].status.as_ref().unwrap().code,
            StatusCode::Error as i32
        );
        assert_eq!(spans[1].kind, SpanKind::Client as i32);
    }

    #[test]
    fn severity_number_by_name() {
        let body = br#"{"resourceLogs":[{"scopeLogs":[{"logRecords":[
            {"severityNumber":"SEVERITY_NUMBER_ERROR","body":{"stringValue":"x"}}]}]}]}"#;
        let r: ExportLogsServiceRequest = from_slice(body).unwrap();
        let record = &r.resource_logs[0].scope_logs[0].log_records[0];
        assert_eq!(record.severity_number, SeverityNumber::Error as i32);
    }

    #[test]
    fn attribute_values_named_like_enums_stay_strings() {
        let body = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"name":"a",
            "kind":"SPAN_KIND_SERVER","attributes":[{"key":"kind",
            "value":{"stringValue":"SPAN_KIND_CLIENT"}}]}]}]}]}"#;
        let r: ExportTraceServiceRequest = from_slice(body).unwrap();
        let span = &r.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.kind, SpanKind::Server as i32);
        let value = format!("{:?}", span.attributes[0].value);
        assert!(value.contains("SPAN_KIND_CLIENT"), "{value}");
    }

    #[test]
    fn unknown_names_are_still_errors_with_a_position() {
        let body = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"kind":"SPAN_KIND_NOPE"}]}]}]}"#;
        let err = from_slice::<ExportTraceServiceRequest>(body).unwrap_err();
        assert!(err.to_string().contains("column"), "{err}");
    }

    #[test]
    fn metrics_temporality_by_name() {
        let mut v: Value = serde_json::from_str(
            r#"{"sum":{"aggregationTemporality":"AGGREGATION_TEMPORALITY_DELTA"}}"#,
        )
        .unwrap();
        assert!(numbers_for_names(&mut v));
        assert_eq!(v["sum"]["aggregationTemporality"], 1);
    }
}
