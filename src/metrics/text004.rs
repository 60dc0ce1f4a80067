//! The Prometheus text format 0.0.4, from prometheus-client's OpenMetrics text: the
//! same samples, less what 0.0.4 cannot carry (`# UNIT`, exemplars, `# EOF`), and with
//! the metadata named as 0.0.4 names it (a counter's HELP and TYPE name its `_total`
//! sample, as client_golang writes them; OpenMetrics `unknown` and `info` become
//! `untyped` and a `_info` gauge).
//!
//! Why a rewrite and not an encoder: prometheus-client 0.25 encodes OpenMetrics text and
//! protobuf only, and its `MetricEncoder` is not pluggable. The families stay in its
//! registry and are encoded by it; this only renames metadata lines of its output, line
//! by line, and writes no family of its own.

/// One pass over the OpenMetrics text; the output is never longer than the input plus
/// `_total`/`_info` on metadata lines.
pub fn from_openmetrics(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A HELP line waits for its TYPE line, which may rename the family.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let (keyword, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            match keyword {
                "HELP" => {
                    flush_help(&mut out, help.take(), None);
                    help = Some((name, text));
                }
                "TYPE" => {
                    let (suffix, kind) = match text {
                        "counter" => ("_total", "counter"),
                        "info" => ("_info", "gauge"),
                        "unknown" => ("", "untyped"),
                        "stateset" => ("", "gauge"),
                        "gaugehistogram" => ("", "histogram"),
                        other => ("", other),
                    };
                    let renamed = help.take();
                    match renamed {
                        Some((help_name, _)) if help_name == name => {
                            flush_help(&mut out, renamed, Some(suffix));
                        }
                        other => flush_help(&mut out, other, None),
                    }
                    push_line(&mut out, &["# TYPE ", name, suffix, " ", kind]);
                }
                // UNIT and EOF have no 0.0.4 form; other comments pass.
                "UNIT" | "EOF" => {}
                _ => push_line(&mut out, &[line]),
            }
            continue;
        }
        flush_help(&mut out, help.take(), None);
        if !line.is_empty() {
            push_line(&mut out, &[without_exemplar(line)]);
        }
    }
    flush_help(&mut out, help, None);
    out
}

fn flush_help(out: &mut String, help: Option<(&str, &str)>, suffix: Option<&str>) {
    if let Some((name, text)) = help {
        push_line(out, &["# HELP ", name, suffix.unwrap_or(""), " ", text]);
    }
}

fn push_line(out: &mut String, parts: &[&str]) {
    for part in parts {
        out.push_str(part);
    }
    out.push('\n');
}

/// A sample line without its ` # {…} value [timestamp]` exemplar. Label values may hold
/// ` # ` themselves, so the cut is looked for outside quotes only.
fn without_exemplar(line: &str) -> &str {
    let bytes = line.as_bytes();
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'#' if !quoted && i > 0 && bytes[i - 1] == b' ' => {
                return line[..i - 1].trim_end();
            }
            _ => {}
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_renamed_and_what_0_0_4_lacks_is_dropped() {
        let om = "# HELP a_seconds Time.\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\n\
                  a_seconds_bucket{le=\"+Inf\",x=\"a # {b}\"} 1 # {trace_id=\"ab\"} 0.5\n\
                  a_seconds_sum{x=\"q\\\" # \"} 0.5\n\
                  # HELP c Requests.\n# TYPE c counter\nc_total 3 # {t=\"1\"} 1.0 1.5\n\
                  # HELP i Build.\n# TYPE i info\ni_info{v=\"1\"} 1\n\
                  # TYPE u unknown\nu 2\n# EOF\n";
        let want = "# HELP a_seconds Time.\n# TYPE a_seconds histogram\n\
                    a_seconds_bucket{le=\"+Inf\",x=\"a # {b}\"} 1\n\
                    a_seconds_sum{x=\"q\\\" # \"} 0.5\n\
                    # HELP c_total Requests.\n# TYPE c_total counter\nc_total 3\n\
                    # HELP i_info Build.\n# TYPE i_info gauge\ni_info{v=\"1\"} 1\n\
                    # TYPE u untyped\nu 2\n";
        assert_eq!(from_openmetrics(om), want);
    }

    #[test]
    fn a_help_line_without_type_is_kept() {
        assert_eq!(
            from_openmetrics("# HELP x X.\nx 1\n# EOF\n"),
            "# HELP x X.\nx 1\n"
        );
    }
}
