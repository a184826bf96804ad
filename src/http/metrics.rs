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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
