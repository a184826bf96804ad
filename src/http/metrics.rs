//! Prometheus metrics: requests by route and status, latency by route, the password
//! hashing pool's load and, on PostgreSQL, how the session memory answered reads.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::store::MemoryReads;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    answer: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// What the parts that count for themselves say at the moment of a scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readings {
    /// Password hashes queued or running.
    pub hash_in_flight: usize,
    /// Password hashes running.
    pub hash_running: usize,
    /// Password hashing threads.
    pub hash_workers: usize,
    /// How the session memory answered reads (PostgreSQL; `None` without one).
    pub memory: Option<MemoryReads>,
}

/// Reads [`Readings`] at each scrape and encodes them as they are: nothing is copied
/// into counters of the registry's own, so there is nothing to keep in step.
struct Live(Box<dyn Fn() -> Readings + Send + Sync>);

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = (self.0)();
        for (name, help, value) in [
            ("password_hash_in_flight", "Password hashes queued or running", now.hash_in_flight),
            ("password_hash_running", "Password hashes running", now.hash_running),
            ("password_hash_workers", "Password hashing threads", now.hash_workers),
        ] {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        if let Some(reads) = now.memory {
            let mut family = encoder.encode_descriptor(
                "session_memory_reads",
                "Reads of a session by this instance (PostgreSQL): answered from memory (hit), from the \
                 database when not remembered (miss) or when the memory was unusable (unleased)",
                None,
                MetricType::Counter,
            )?;
            for (answer, count) in [("hit", reads.hits), ("miss", reads.misses), ("unleased", reads.unleased)] {
                ConstCounter::new(count).encode(family.encode_family(&AnswerLabels { answer })?)?;
            }
        }
        Ok(())
    }
}

/// The service's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
}

impl Metrics {
    /// Registers every metric; `readings` is called at each scrape.
    pub fn new(readings: impl Fn() -> Readings + Send + Sync + 'static) -> Self {
        let mut registry = Registry::with_prefix("gatehouse");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register("http_request_duration_seconds", "Time to answer, by route", latency.clone());
        registry.register_collector(Box::new(Live(Box::new(readings))));
        Self { registry, requests, latency }
    }

    /// Counts one answered request.
    pub fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { method: method.to_owned(), route: route.to_owned(), status })
            .inc();
        self.latency.get_or_create(&RouteLabels { route: route.to_owned() }).observe(seconds);
    }

    /// The OpenMetrics text exposition, with the readings taken now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`prometheus_text`]'s.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An OpenMetrics exposition in Prometheus's text format 0.0.4, for scrapers that do
/// not ask for OpenMetrics: a counter's family takes its samples' name (with `_total`),
/// and there is no `# EOF`. Nothing else the registry writes differs.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines().filter(|l| *l != "# EOF") {
        let renamed = ["# HELP ", "# TYPE "].into_iter().find_map(|p| {
            let (name, rest) = line.strip_prefix(p)?.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {rest}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_names_each_family_as_its_samples_and_has_no_eof() {
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(3));
        let seen = hits.clone();
        let m = Metrics::new(move || Readings {
            hash_in_flight: 1,
            hash_running: 1,
            hash_workers: 2,
            memory: Some(MemoryReads { hits: seen.load(std::sync::atomic::Ordering::Relaxed), misses: 1, unleased: 0 }),
        });
        m.observe("GET", "/v1/me", 200, 0.001);
        let om = m.render();
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = prometheus_text(&om);
        assert!(!text.contains("# EOF"), "{text}");
        let typed: Vec<(&str, &str)> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' ')).collect();
        assert!(typed.contains(&("gatehouse_http_requests_total", "counter")), "{text}");
        assert!(typed.contains(&("gatehouse_session_memory_reads_total", "counter")), "{text}");
        assert!(typed.contains(&("gatehouse_password_hash_workers", "gauge")), "{text}");
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap_or_default();
            let family = typed.iter().any(|(t, kind)| {
                name == *t
                    || (*kind == "histogram" && ["_bucket", "_sum", "_count"].iter().any(|s| name == format!("{t}{s}")))
            });
            assert!(family, "sample {name} has no family of its name: {text}");
        }
        assert!(text.contains("gatehouse_session_memory_reads_total{answer=\"hit\"} 3\n"), "{text}");
        assert!(text.contains("gatehouse_password_hash_in_flight 1\n"), "{text}");
        assert!(text.contains("gatehouse_password_hash_running 1\n"), "{text}");
        assert!(text.contains("gatehouse_password_hash_workers 2\n"), "{text}");
        // Read at each scrape, as they are then.
        hits.store(7, std::sync::atomic::Ordering::Relaxed);
        assert!(prometheus_text(&m.render()).contains("{answer=\"hit\"} 7\n"));
    }

    #[test]
    fn without_a_session_memory_there_is_no_reads_family() {
        let m = Metrics::new(|| Readings { hash_in_flight: 0, hash_running: 0, hash_workers: 2, memory: None });
        let text = prometheus_text(&m.render());
        assert!(!text.contains("session_memory_reads"), "{text}");
        assert!(text.contains("gatehouse_password_hash_workers 2\n"), "{text}");
    }
}
