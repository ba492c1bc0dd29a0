//! Metric expositions, shared by the node's and the fleet's `/metrics` (`docs/0007-telemetry.md`).
//!
//! A scrape builds an [`Exposition`] (families of samples, from the current state) and encodes it
//! in the format the scraper asked for ([`Format::negotiate`] on the `Accept` header):
//!
//! - OpenMetrics 1.0 text, through the `prometheus-client` crate's encoder (what Prometheus asks
//!   for first);
//! - the Prometheus text format 0.0.4 (what dcgm-exporter serves, what `promtool check metrics`
//!   and `curl` read).
//!
//! Names are the same in both. dcgm-exporter's counters (`DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`,
//! ECC, remapped rows, PCIe replays) keep their exact sample names, which OpenMetrics allows for a
//! counter only with a `_total` suffix: in OpenMetrics they are typed `unknown` (the exact name
//! matters more to existing dashboards than the type line), in 0.0.4 `counter` as dcgm-exporter
//! types them. Hearth's own counters follow the conventions: the family name plus `_total`.

use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// OpenMetrics' content type.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's content type.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A Hearth counter: samples are named `NAME_total`.
    Counter,
    /// A dcgm-exporter counter: samples keep the exact name (typed `counter` in 0.0.4,
    /// `unknown` in OpenMetrics).
    DcgmCounter,
}

/// Labels of a sample: a shared set (a GPU's identity) and the sample's own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labels {
    /// Shared labels, first (a GPU's `gpu`, `UUID`, `device`, …).
    pub shared: Arc<Vec<(&'static str, String)>>,
    /// The sample's own labels, after the shared ones.
    pub own: Vec<(&'static str, String)>,
}

impl Labels {
    /// Only shared labels.
    pub fn shared(shared: &Arc<Vec<(&'static str, String)>>) -> Self {
        Self { shared: shared.clone(), own: Vec::new() }
    }

    /// Only the sample's own labels.
    pub fn own(own: Vec<(&'static str, String)>) -> Self {
        Self { shared: Arc::default(), own }
    }

    fn iter(&self) -> impl Iterator<Item = &(&'static str, String)> {
        self.shared.iter().chain(self.own.iter())
    }
}

/// One sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Its labels.
    pub labels: Labels,
    /// Its value.
    pub value: f64,
}

/// One metric family.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Name (without `_total` for [`Kind::Counter`]).
    pub name: &'static str,
    /// Help text.
    pub help: &'static str,
    /// Type.
    pub kind: Kind,
    /// Samples (a family without samples is not written).
    pub samples: Vec<Sample>,
}

/// A whole exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// Families in order.
    pub families: Vec<Family>,
}

/// Which text format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// Prometheus text 0.0.4.
    Text,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text`, else the 0.0.4 text format.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text,
        }
    }

    /// Its content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Self::Text => TEXT_CONTENT_TYPE,
        }
    }
}

impl Exposition {
    /// Start a family; returns it to push samples into.
    pub fn family(&mut self, name: &'static str, help: &'static str, kind: Kind) -> &mut Family {
        self.families.push(Family { name, help, kind, samples: Vec::new() });
        let last = self.families.len() - 1;
        &mut self.families[last]
    }

    /// Encode in `format`.
    pub fn encode(self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.openmetrics(),
            Format::Text => self.text(),
        }
    }

    /// Prometheus text format 0.0.4.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.families.len() * 256);
        for f in self.families.iter().filter(|f| !f.samples.is_empty()) {
            let suffix = if f.kind == Kind::Counter { "_total" } else { "" };
            let ty = if f.kind == Kind::Gauge { "gauge" } else { "counter" };
            let _ = writeln!(out, "# HELP {}{suffix} {}", f.name, escape_help(f.help));
            let _ = writeln!(out, "# TYPE {}{suffix} {ty}", f.name);
            for s in &f.samples {
                out.push_str(f.name);
                out.push_str(suffix);
                write_labels(&mut out, &s.labels);
                out.push(' ');
                write_value(&mut out, s.value);
                out.push('\n');
            }
        }
        out
    }

    /// OpenMetrics 1.0 text, through `prometheus-client`.
    pub fn openmetrics(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Owned(self)));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[derive(Debug)]
struct Owned(Exposition);

/// One sample's value as the encoder wants it.
#[derive(Debug)]
struct Value(Kind, f64);

impl EncodeMetric for Value {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        match self.0 {
            Kind::Counter => encoder
                .encode_counter::<prometheus_client::encoding::NoLabelSet, f64, f64>(&self.1, None),
            Kind::Gauge | Kind::DcgmCounter => encoder.encode_gauge(&self.1),
        }
    }

    fn metric_type(&self) -> MetricType {
        match self.0 {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::DcgmCounter => MetricType::Unknown,
        }
    }
}

impl Collector for Owned {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in self.0.families.iter().filter(|f| !f.samples.is_empty()) {
            let ty = Value(f.kind, 0.0).metric_type();
            let mut family = encoder.encode_descriptor(f.name, f.help, None, ty)?;
            for s in &f.samples {
                let labels: Vec<(&str, &str)> =
                    s.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                Value(f.kind, s.value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn write_labels(out: &mut String, labels: &Labels) {
    let mut first = true;
    for (k, v) in labels.iter() {
        out.push(if first { '{' } else { ',' });
        first = false;
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    if !first {
        out.push('}');
    }
}

fn write_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

/// One parsed sample: name, labels in order, value.
pub type ParsedSample = (String, Vec<(String, String)>, f64);

/// Parse a 0.0.4 text exposition's samples into `(name, labels, value)` (tests and the
/// Prometheus check compare values with it). Comments and blank lines are skipped; a malformed
/// line is an error naming it.
pub fn parse_text(text: &str) -> Result<Vec<ParsedSample>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        let (head, value) = line.rsplit_once(' ').ok_or_else(|| bad("no value"))?;
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| bad("value is not a number"))?,
        };
        let (name, labels) = match head.split_once('{') {
            None => (head.to_string(), Vec::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').ok_or_else(|| bad("unclosed labels"))?;
                (name.to_string(), parse_labels(body).ok_or_else(|| bad("bad labels"))?)
            }
        };
        out.push((name, labels, value));
    }
    Ok(out)
}

fn parse_labels(body: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if key.is_empty() {
            return if out.is_empty() && body.is_empty() { Some(out) } else { None };
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => val.push('\n'),
                    c => val.push(c),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        out.push((key, val));
        match chars.next() {
            None => return Some(out),
            Some(',') => {}
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Exposition {
        let gpu = Arc::new(vec![("gpu", "0".to_string()), ("UUID", "GPU-a\"b".to_string())]);
        let mut e = Exposition::default();
        e.family("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", Kind::Gauge)
            .samples
            .push(Sample { labels: Labels::shared(&gpu), value: 41.0 });
        e.family("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Energy (in mJ).", Kind::DcgmCounter)
            .samples
            .push(Sample { labels: Labels::shared(&gpu), value: 12345.0 });
        e.family("hearth_gpu_xid_errors", "XIDs.", Kind::Counter).samples.push(Sample {
            labels: Labels { shared: gpu.clone(), own: vec![("xid", "79".into())] },
            value: 2.0,
        });
        e.family("hearth_empty", "Nothing.", Kind::Gauge);
        e
    }

    #[test]
    fn text_format_keeps_dcgm_names_and_suffixes_hearth_counters() {
        let t = sample().text();
        assert!(t.contains("# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"), "{t}");
        assert!(t.contains("DCGM_FI_DEV_GPU_TEMP{gpu=\"0\",UUID=\"GPU-a\\\"b\"} 41\n"), "{t}");
        assert!(t.contains("# TYPE hearth_gpu_xid_errors_total counter\n"), "{t}");
        assert!(
            t.contains("hearth_gpu_xid_errors_total{gpu=\"0\",UUID=\"GPU-a\\\"b\",xid=\"79\"} 2\n")
        );
        assert!(!t.contains("hearth_empty"));
        let parsed = parse_text(&t).expect("parses");
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].1[1], ("UUID".to_string(), "GPU-a\"b".to_string()));
        assert_eq!(parsed[1].2, 12345.0);
    }

    #[test]
    fn openmetrics_keeps_the_same_sample_names() {
        let t = sample().openmetrics();
        assert!(t.ends_with("# EOF\n"), "{t}");
        assert!(t.contains("# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION unknown\n"), "{t}");
        assert!(t.contains("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu=\"0\""), "{t}");
        assert!(t.contains("# TYPE hearth_gpu_xid_errors counter\n"), "{t}");
        assert!(t.contains("hearth_gpu_xid_errors_total{gpu=\"0\""), "{t}");
        assert!(!t.contains("hearth_empty"));
    }

    #[test]
    fn accept_header_picks_the_format() {
        let prom =
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(None), Format::Text);
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        assert!(parse_text("a{b=\"c\" 1").expect_err("unclosed").contains("line 1"));
        assert!(parse_text("ok 1\nbad").expect_err("no value").contains("line 2"));
        assert!(parse_text("a{b=c} 1").is_err());
        assert_eq!(parse_text("a{} 1").map(|v| v.len()), Ok(1));
    }
}
