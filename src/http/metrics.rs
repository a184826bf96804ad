//! Prometheus metrics: requests by route and status, latency by route, the password
//! hashing pool's load and, on PostgreSQL, how the session memory answered reads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
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

/// The service's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    hash_in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    hash_capacity: Gauge<i64, std::sync::atomic::AtomicI64>,
    memory_reads: Family<AnswerLabels, Counter>,
    /// One rendering at a time: the memory's counts are carried into the counters.
    rendering: std::sync::Mutex<()>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gatehouse");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let hash_in_flight = Gauge::default();
        let hash_capacity = Gauge::default();
        registry.register("http_requests", "HTTP requests answered", requests.clone());
        registry.register("http_request_duration_seconds", "Time to answer, by route", latency.clone());
        registry.register("password_hash_in_flight", "Password hashes queued or running", hash_in_flight.clone());
        registry.register("password_hash_workers", "Password hashing threads", hash_capacity.clone());
        let memory_reads = Family::<AnswerLabels, Counter>::default();
        registry.register(
            "session_memory_reads",
            "Reads of a session by this instance (PostgreSQL): answered from memory (hit), from the \
             database when not remembered (miss) or when the memory was unusable (unleased)",
            memory_reads.clone(),
        );
        Self { registry, requests, latency, hash_in_flight, hash_capacity, memory_reads, rendering: Default::default() }
    }

    /// Counts one answered request.
    pub fn observe(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { method: method.to_owned(), route: route.to_owned(), status })
            .inc();
        self.latency.get_or_create(&RouteLabels { route: route.to_owned() }).observe(seconds);
    }

    /// The text exposition, with the hashing pool's load and the memory's reads read now.
    pub fn render(&self, hash_in_flight: usize, hash_workers: usize, memory: Option<MemoryReads>) -> String {
        let _one = self.rendering.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.hash_in_flight.set(i64::try_from(hash_in_flight).unwrap_or(i64::MAX));
        self.hash_capacity.set(i64::try_from(hash_workers).unwrap_or(i64::MAX));
        if let Some(reads) = memory {
            for (answer, count) in [("hit", reads.hits), ("miss", reads.misses), ("unleased", reads.unleased)] {
                let counter = self.memory_reads.get_or_create(&AnswerLabels { answer });
                counter.inc_by(count.saturating_sub(counter.get()));
            }
        }
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prometheus_text_names_each_family_as_its_samples_and_has_no_eof() {
        let m = Metrics::new();
        m.observe("GET", "/v1/me", 200, 0.001);
        let reads = MemoryReads { hits: 3, misses: 1, unleased: 0 };
        let om = m.render(1, 2, Some(reads));
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = prometheus_text(&om);
        assert!(!text.contains("# EOF"), "{text}");
        let typed: Vec<(&str, &str)> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' ')).collect();
        assert!(typed.contains(&("gatehouse_http_requests_total", "counter")), "{text}");
        assert!(typed.contains(&("gatehouse_session_memory_reads_total", "counter")), "{text}");
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap_or_default();
            let family = typed.iter().any(|(t, kind)| {
                name == *t
                    || (*kind == "histogram" && ["_bucket", "_sum", "_count"].iter().any(|s| name == format!("{t}{s}")))
            });
            assert!(family, "sample {name} has no family of its name: {text}");
        }
        assert!(text.contains("gatehouse_session_memory_reads_total{answer=\"hit\"} 3"), "{text}");
        // The same again: counts carried over once, not twice.
        assert!(prometheus_text(&m.render(0, 2, Some(reads))).contains("{answer=\"hit\"} 3"));
    }
}
