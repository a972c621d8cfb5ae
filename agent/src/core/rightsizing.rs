//! Right-sizing: request recommendations per container from measured CPU and memory, and the
//! cheapest node shape for the sum of them.
//!
//! Pure: the adapter samples cgroupfs and feeds [`Sample`]s, OOM kills and what it knows of the
//! container (memory limit, JVM options of its image) into a [`Recommender`]; it asks for
//! [`ContainerRecommendation`]s, writes [`Recommender::checkpoint`] bytes to disk and hands
//! them back to [`Recommender::restore`] at start. Time is always passed in.
//!
//! The maths, every constant and the output fields are documented in `docs/rightsizing.md`;
//! the formula is also on [`ContainerState::recommend`]. In short:
//!
//! - CPU usage samples (cores) and memory peaks per aggregation window (bytes) go into
//!   [`DecayingHistogram`]s: exponential buckets, each sample's weight doubling every half-life
//!   of later time (so older samples count half as much per half-life of age);
//! - target / lower / upper are percentiles (P90 / P50 / P95) times a safety margin, the bounds
//!   widened while history is short, then floors: a minimum, the observed memory peak, a bump
//!   after an OOM kill, and for JVMs the configured heap plus overhead.
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const DAY_S: f64 = 86_400.0;

/// Everything that can go wrong in right-sizing: a bad configuration, a checkpoint that cannot
/// be read back, an instance catalog that does not parse, JVM options the JVM itself would
/// refuse.
#[derive(Debug, thiserror::Error)]
pub enum RightsizingError {
    #[error("invalid right-sizing setting {field}: {why}")]
    InvalidConfig { field: &'static str, why: String },
    #[error("histograms with different bucket layouts or half-lives cannot be merged")]
    IncompatibleHistograms,
    #[error(
        "not a ragent right-sizing checkpoint (it does not start with {CHECKPOINT_MAGIC:?}): it is ignored and history starts afresh"
    )]
    NotACheckpoint,
    #[error(
        "the checkpoint is truncated ({found} of {expected} bytes): it is ignored and history starts afresh"
    )]
    Truncated { expected: u64, found: u64 },
    #[error(
        "the checkpoint has format version {found}, this ragent reads version {supported}: it is ignored and history starts afresh"
    )]
    UnsupportedVersion { found: String, supported: u32 },
    #[error(
        "the checkpoint's sha256 does not match its contents (header {expected}, contents {found}): it is ignored and history starts afresh"
    )]
    ChecksumMismatch { expected: String, found: String },
    #[error("the checkpoint is corrupt ({what}): it is ignored and history starts afresh")]
    Corrupt { what: &'static str },
    #[error(
        "the checkpoint's contents do not parse ({source}): it is ignored and history starts afresh"
    )]
    CorruptBody {
        #[source]
        source: serde_json::Error,
    },
    #[error("the instance catalog is not valid TOML of the expected shape: {source}")]
    CatalogToml {
        #[source]
        source: toml::de::Error,
    },
    #[error("instance type {name:?} in the catalog: {why}")]
    CatalogEntry { name: String, why: &'static str },
    #[error("the instance catalog lists no instance types: add [[instance_type]] entries")]
    CatalogEmpty,
    #[error("JVM option {option:?}: {why} (the JVM would refuse to start with it)")]
    JvmOption { option: String, why: &'static str },
}

impl RightsizingError {
    /// A bounded label per variant, for metrics (e.g. why a checkpoint was ignored).
    pub fn metric_label(&self) -> &'static str {
        match self {
            RightsizingError::InvalidConfig { .. } => "invalid_config",
            RightsizingError::IncompatibleHistograms => "incompatible_histograms",
            RightsizingError::NotACheckpoint => "not_a_checkpoint",
            RightsizingError::Truncated { .. } => "truncated",
            RightsizingError::UnsupportedVersion { .. } => "unsupported_version",
            RightsizingError::ChecksumMismatch { .. } => "checksum_mismatch",
            RightsizingError::Corrupt { .. } | RightsizingError::CorruptBody { .. } => "corrupt",
            RightsizingError::CatalogToml { .. }
            | RightsizingError::CatalogEntry { .. }
            | RightsizingError::CatalogEmpty => "catalog",
            RightsizingError::JvmOption { .. } => "jvm_option",
        }
    }
}

fn invalid(field: &'static str, why: impl Into<String>) -> RightsizingError {
    RightsizingError::InvalidConfig {
        field,
        why: why.into(),
    }
}

/// Milliseconds since the Unix epoch (0 for times before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

// ---------------------------------------------------------------------------------------------
// Decaying histogram
// ---------------------------------------------------------------------------------------------

/// Bucket layout and decay of a [`DecayingHistogram`].
///
/// Bucket 0 is `[0, first_bucket)`; bucket `i ≥ 1` starts at
/// `start(i) = first_bucket × (ratio^i − 1) / (ratio − 1)`, so each bucket is `ratio` times as
/// wide as the one before. There are as many buckets as needed for `max_value` to fall in one;
/// larger values count in the last bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistogramOptions {
    /// Width of the first bucket, in the value's unit (cores, bytes).
    pub first_bucket: f64,
    /// Growth of each bucket's width over the previous one (> 1).
    pub ratio: f64,
    /// The largest value that gets a bucket of its own.
    pub max_value: f64,
    /// A sample's weight relative to one taken this much later halves.
    pub half_life_s: f64,
}

/// The most buckets a layout may have (a guard against a ratio of 1.000001).
pub const MAX_BUCKETS: usize = 10_000;

/// When the newest sample is this many half-lives after the reference time, the histogram
/// moves its reference to that sample and scales its weights down (2^64 is far from f64's
/// limits, so nothing overflows however long the agent runs).
const MAX_DECAY_EXPONENT: f64 = 64.0;

impl HistogramOptions {
    /// CPU usage in cores: 10 mCPU first bucket, 5 % growth, up to 1000 cores, 24 h half-life.
    pub const CPU: HistogramOptions = HistogramOptions {
        first_bucket: 0.01,
        ratio: 1.05,
        max_value: 1000.0,
        half_life_s: DAY_S,
    };
    /// Memory in bytes: 1 MiB first bucket, 5 % growth, up to 1 TiB, 24 h half-life.
    pub const MEMORY: HistogramOptions = HistogramOptions {
        first_bucket: MIB as f64,
        ratio: 1.05,
        max_value: (1024 * GIB) as f64,
        half_life_s: DAY_S,
    };

    pub fn validate(&self, field: &'static str) -> Result<(), RightsizingError> {
        let finite = |v: f64| v.is_finite() && v > 0.0;
        if !finite(self.first_bucket) {
            return Err(invalid(field, "first_bucket must be a positive number"));
        }
        if !(self.ratio.is_finite() && self.ratio > 1.0) {
            return Err(invalid(field, "ratio must be greater than 1"));
        }
        if !(finite(self.max_value) && self.max_value >= self.first_bucket) {
            return Err(invalid(field, "max_value must be at least first_bucket"));
        }
        if !finite(self.half_life_s) {
            return Err(invalid(field, "half_life_s must be a positive number"));
        }
        if self.raw_index(self.max_value) >= MAX_BUCKETS as f64 {
            return Err(invalid(
                field,
                format!(
                    "the layout needs more than {MAX_BUCKETS} buckets: raise ratio or first_bucket"
                ),
            ));
        }
        Ok(())
    }

    fn raw_index(&self, v: f64) -> f64 {
        ((v * (self.ratio - 1.0) / self.first_bucket + 1.0).ln() / self.ratio.ln()).floor()
    }

    /// How many buckets the layout has.
    pub fn buckets(&self) -> usize {
        self.unclamped_bucket(self.max_value) + 1
    }

    /// Where bucket `i` starts (its lower edge, inclusive).
    pub fn bucket_start(&self, i: usize) -> f64 {
        if i == 0 {
            0.0
        } else {
            self.first_bucket * (self.ratio.powi(i as i32) - 1.0) / (self.ratio - 1.0)
        }
    }

    /// Where bucket `i` ends (exclusive): the start of the next one.
    pub fn bucket_end(&self, i: usize) -> f64 {
        self.bucket_start(i + 1)
    }

    fn unclamped_bucket(&self, v: f64) -> usize {
        if v.is_nan() || v < self.first_bucket {
            return 0;
        }
        let raw = self.raw_index(v);
        let mut i = if raw.is_finite() && raw > 0.0 {
            (raw as usize).min(MAX_BUCKETS)
        } else {
            0
        };
        // The logarithm can land one off at an edge; the edges themselves decide.
        while i > 0 && self.bucket_start(i) > v {
            i -= 1;
        }
        while i < MAX_BUCKETS && self.bucket_start(i + 1) <= v {
            i += 1;
        }
        i
    }

    /// The bucket a value counts in (negative values in the first, values above `max_value`
    /// in the last).
    pub fn bucket_of(&self, v: f64) -> usize {
        self.unclamped_bucket(v).min(self.buckets() - 1)
    }
}

/// A histogram of values with exponentially growing buckets whose samples decay: a sample
/// added at time `t` weighs `weight × 2^((t − reference) / half_life)`, so between two samples
/// of equal weight the older one counts half as much per half-life between them. Only ratios of
/// weights matter to percentiles; [`DecayingHistogram::total_weight_at`] gives the weight as
/// seen from a point in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "HistogramState", into = "HistogramState")]
pub struct DecayingHistogram {
    options: HistogramOptions,
    /// The time weights are relative to, in ms since the Unix epoch.
    reference_ms: u64,
    weights: Vec<f64>,
    total: f64,
}

/// What a histogram looks like in a checkpoint: its layout, reference time and the non-empty
/// buckets only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistogramState {
    options: HistogramOptions,
    reference_ms: u64,
    /// (bucket index, weight relative to the reference time)
    buckets: Vec<(usize, f64)>,
}

impl From<DecayingHistogram> for HistogramState {
    fn from(h: DecayingHistogram) -> HistogramState {
        HistogramState {
            options: h.options,
            reference_ms: h.reference_ms,
            buckets: h
                .weights
                .iter()
                .enumerate()
                .filter(|(_, w)| **w > 0.0)
                .map(|(i, w)| (i, *w))
                .collect(),
        }
    }
}

impl TryFrom<HistogramState> for DecayingHistogram {
    type Error = RightsizingError;

    fn try_from(s: HistogramState) -> Result<DecayingHistogram, RightsizingError> {
        s.options.validate("histogram")?;
        let mut h = DecayingHistogram::new(s.options);
        h.reference_ms = s.reference_ms;
        for (i, w) in s.buckets {
            if i >= h.weights.len() || !w.is_finite() || w < 0.0 {
                return Err(invalid(
                    "histogram",
                    "a bucket is out of range or has a bad weight",
                ));
            }
            h.weights[i] += w;
        }
        h.total = h.weights.iter().sum();
        Ok(h)
    }
}

impl DecayingHistogram {
    /// An empty histogram. `options` must have passed [`HistogramOptions::validate`].
    pub fn new(options: HistogramOptions) -> DecayingHistogram {
        DecayingHistogram {
            options,
            reference_ms: 0,
            weights: vec![0.0; options.buckets()],
            total: 0.0,
        }
    }

    pub fn options(&self) -> &HistogramOptions {
        &self.options
    }

    pub fn is_empty(&self) -> bool {
        self.total <= 0.0
    }

    /// The sum of the weights, relative to the reference time (only its ratio to other sums of
    /// the same histogram means anything; see [`Self::total_weight_at`]).
    pub fn total_weight(&self) -> f64 {
        self.total
    }

    /// The sum of the weights as seen at `at`: each sample's weight halved once per half-life
    /// between its time and `at`.
    pub fn total_weight_at(&self, at: SystemTime) -> f64 {
        self.total * self.factor(unix_ms(at)).recip()
    }

    /// `2^((t − reference) / half_life)`.
    fn factor(&self, t_ms: u64) -> f64 {
        self.exponent(t_ms).exp2()
    }

    fn exponent(&self, t_ms: u64) -> f64 {
        (t_ms as f64 - self.reference_ms as f64) / 1000.0 / self.options.half_life_s
    }

    /// Moves the reference time to `t_ms`, scaling every weight by `2^(−Δ / half_life)`.
    fn shift_reference(&mut self, t_ms: u64) {
        let scale = self.factor(t_ms).recip();
        for w in &mut self.weights {
            *w *= scale;
            if !w.is_normal() {
                *w = 0.0;
            }
        }
        self.total = self.weights.iter().sum();
        self.reference_ms = t_ms;
    }

    /// Adds `value` with `weight` at time `at`. Non-finite values and non-positive or
    /// non-finite weights are ignored.
    pub fn add(&mut self, value: f64, weight: f64, at: SystemTime) {
        if !value.is_finite() || !weight.is_finite() || weight <= 0.0 {
            return;
        }
        let t = unix_ms(at);
        if self.is_empty() {
            self.weights.iter_mut().for_each(|w| *w = 0.0);
            self.reference_ms = t;
        } else if self.exponent(t) > MAX_DECAY_EXPONENT {
            self.shift_reference(t);
        }
        let w = weight * self.factor(t);
        if !w.is_normal() {
            return; // so old relative to the reference that it weighs nothing
        }
        self.weights[self.options.bucket_of(value)] += w;
        self.total += w;
    }

    /// The value below which a fraction `p` (0–1) of the weight lies: the *end* of the first
    /// bucket at which the cumulative weight reaches `p × total` (so the answer is at most one
    /// bucket above the exact weighted percentile, never below it). `None` when empty.
    pub fn percentile(&self, p: f64) -> Option<f64> {
        if self.is_empty() {
            return None;
        }
        let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
        let threshold = p * self.total;
        let mut cumulative = 0.0;
        let mut last = 0;
        for (i, w) in self.weights.iter().enumerate() {
            if *w <= 0.0 {
                continue;
            }
            cumulative += w;
            last = i;
            if cumulative >= threshold {
                return Some(self.options.bucket_end(i));
            }
        }
        // Only rounding gets here (cumulative a hair below total × 1.0).
        Some(self.options.bucket_end(last))
    }

    /// Adds every sample of `other` (same layout and half-life) to this histogram.
    pub fn merge(&mut self, other: &DecayingHistogram) -> Result<(), RightsizingError> {
        if self.options != other.options {
            return Err(RightsizingError::IncompatibleHistograms);
        }
        if other.is_empty() {
            return Ok(());
        }
        if self.is_empty() {
            *self = other.clone();
            return Ok(());
        }
        let mut other = other.clone();
        let reference = self.reference_ms.max(other.reference_ms);
        if self.reference_ms != reference {
            self.shift_reference(reference);
        }
        if other.reference_ms != reference {
            other.shift_reference(reference);
        }
        for (w, o) in self.weights.iter_mut().zip(&other.weights) {
            *w += o;
        }
        self.total = self.weights.iter().sum();
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// How recommendations are made. Defaults are the values documented in `docs/rightsizing.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RightsizingConfig {
    /// CPU usage histogram (cores). Default [`HistogramOptions::CPU`].
    pub cpu_histogram: HistogramOptions,
    /// Memory peak histogram (bytes). Default [`HistogramOptions::MEMORY`].
    pub memory_histogram: HistogramOptions,
    /// Length of a memory aggregation window: the peak of each window is one histogram sample.
    /// Default 86 400 s (24 h).
    pub memory_window_s: u64,
    /// Percentiles (0–1) of CPU usage for target, lower and upper. Default 0.9, 0.5, 0.95.
    pub cpu_target_percentile: f64,
    pub cpu_lower_percentile: f64,
    pub cpu_upper_percentile: f64,
    /// Percentiles (0–1) of the memory peaks for target, lower and upper. Default 0.9, 0.5, 0.95.
    pub memory_target_percentile: f64,
    pub memory_lower_percentile: f64,
    pub memory_upper_percentile: f64,
    /// Added to every estimate: 0.15 is +15 %. Default 0.15.
    pub safety_margin: f64,
    /// No CPU recommendation below this. Default 0.01 cores (10 mCPU).
    pub cpu_floor_cores: f64,
    /// No memory recommendation below this. Default 20 MiB.
    pub memory_floor_bytes: u64,
    /// `U` in the upper bound's widening `1 + U / d`. Default 1 day.
    pub upper_widening_days: f64,
    /// The widening factor of the upper bound never exceeds this. Default 10.
    pub max_upper_factor: f64,
    /// `L` in the lower bound's narrowing `d / (d + L)`. Default 1/24 day (1 h).
    pub lower_widening_days: f64,
    /// After an OOM kill, memory target ≥ memory at the kill × this. Default 1.2.
    pub oom_bump_ratio: f64,
    /// … and ≥ memory at the kill + this. Default 100 MiB.
    pub oom_min_bump_bytes: u64,
    /// Containers without a sample or an OOM kill for this long are forgotten. Default 7 days.
    pub retention_s: u64,
}

impl Default for RightsizingConfig {
    fn default() -> RightsizingConfig {
        RightsizingConfig {
            cpu_histogram: HistogramOptions::CPU,
            memory_histogram: HistogramOptions::MEMORY,
            memory_window_s: 86_400,
            cpu_target_percentile: 0.9,
            cpu_lower_percentile: 0.5,
            cpu_upper_percentile: 0.95,
            memory_target_percentile: 0.9,
            memory_lower_percentile: 0.5,
            memory_upper_percentile: 0.95,
            safety_margin: 0.15,
            cpu_floor_cores: 0.01,
            memory_floor_bytes: 20 * MIB,
            upper_widening_days: 1.0,
            max_upper_factor: 10.0,
            lower_widening_days: 1.0 / 24.0,
            oom_bump_ratio: 1.2,
            oom_min_bump_bytes: 100 * MIB,
            retention_s: 7 * 86_400,
        }
    }
}

impl RightsizingConfig {
    pub fn validate(&self) -> Result<(), RightsizingError> {
        self.cpu_histogram.validate("cpu_histogram")?;
        self.memory_histogram.validate("memory_histogram")?;
        let percentiles = [
            ("cpu_lower_percentile", self.cpu_lower_percentile),
            ("cpu_target_percentile", self.cpu_target_percentile),
            ("cpu_upper_percentile", self.cpu_upper_percentile),
            ("memory_lower_percentile", self.memory_lower_percentile),
            ("memory_target_percentile", self.memory_target_percentile),
            ("memory_upper_percentile", self.memory_upper_percentile),
        ];
        for (field, p) in percentiles {
            if !(0.0..=1.0).contains(&p) {
                return Err(invalid(field, format!("{p} is not between 0 and 1")));
            }
        }
        if !(self.cpu_lower_percentile <= self.cpu_target_percentile
            && self.cpu_target_percentile <= self.cpu_upper_percentile)
        {
            return Err(invalid(
                "cpu_target_percentile",
                "must lie between the lower and upper percentiles",
            ));
        }
        if !(self.memory_lower_percentile <= self.memory_target_percentile
            && self.memory_target_percentile <= self.memory_upper_percentile)
        {
            return Err(invalid(
                "memory_target_percentile",
                "must lie between the lower and upper percentiles",
            ));
        }
        let non_negative = [
            ("safety_margin", self.safety_margin),
            ("cpu_floor_cores", self.cpu_floor_cores),
            ("upper_widening_days", self.upper_widening_days),
            ("lower_widening_days", self.lower_widening_days),
        ];
        for (field, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(field, format!("{v} is not a number ≥ 0")));
            }
        }
        if !(self.max_upper_factor.is_finite() && self.max_upper_factor >= 1.0) {
            return Err(invalid("max_upper_factor", "must be a number ≥ 1"));
        }
        if !(self.oom_bump_ratio.is_finite() && self.oom_bump_ratio >= 1.0) {
            return Err(invalid("oom_bump_ratio", "must be a number ≥ 1"));
        }
        if self.memory_window_s == 0 {
            return Err(invalid("memory_window_s", "must be at least 1 second"));
        }
        if self.retention_s == 0 {
            return Err(invalid("retention_s", "must be at least 1 second"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// JVM memory
// ---------------------------------------------------------------------------------------------

/// Metaspace assumed when `-XX:MaxMetaspaceSize` is not set: 96 MiB (a mid-sized Spring-style
/// app loads 15–20k classes, ~60–90 MiB of metaspace).
pub const JVM_DEFAULT_METASPACE_BYTES: u64 = 96 * MIB;
/// Code cache assumed when `-XX:ReservedCodeCacheSize` is not set: 48 MiB (what a warmed-up
/// server app typically fills of the 240 MiB the JVM reserves).
pub const JVM_DEFAULT_CODE_CACHE_BYTES: u64 = 48 * MIB;
/// Threads assumed (GC, JIT, app and pool threads of a typical web app): 50.
pub const JVM_THREADS: u64 = 50;
/// Stack per thread when `-Xss` is not set: 1 MiB (the JVM's default on 64-bit Linux).
pub const JVM_DEFAULT_STACK_BYTES: u64 = MIB;
/// Fixed native overhead (GC data structures, symbol tables, malloc arenas, the JVM itself).
pub const JVM_NATIVE_BYTES: u64 = 32 * MIB;
/// Native overhead proportional to the heap (GC remembered sets, card tables): 5 % of it.
pub const JVM_HEAP_OVERHEAD_RATIO: f64 = 0.05;

/// The JVM's maximum heap as configured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JvmHeap {
    /// `-Xmx` / `-XX:MaxHeapSize`.
    Bytes(u64),
    /// `-XX:MaxRAMPercentage`: this percentage of the container's memory limit.
    PercentOfLimit(f64),
}

/// The memory settings of a JVM, read from its options.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct JvmMemory {
    pub heap: JvmHeap,
    pub metaspace_bytes: Option<u64>,
    pub code_cache_bytes: Option<u64>,
    pub thread_stack_bytes: Option<u64>,
    pub direct_memory_bytes: Option<u64>,
}

impl JvmMemory {
    /// The heap in bytes: `-Xmx` as given, or the percentage of `memory_limit` (`None`
    /// without a limit: the JVM would size it from the node's memory).
    pub fn heap_bytes(&self, memory_limit: Option<u64>) -> Option<u64> {
        match self.heap {
            JvmHeap::Bytes(b) => Some(b),
            JvmHeap::PercentOfLimit(p) => {
                memory_limit.map(|l| (l as f64 * p / 100.0).floor() as u64)
            }
        }
    }

    /// The least memory this JVM needs:
    /// `heap + metaspace + code cache + 50 × stack + direct memory + 32 MiB + ⌈5 % × heap⌉`,
    /// with the defaults above for what the options do not set (direct memory: 0).
    pub fn floor_bytes(&self, memory_limit: Option<u64>) -> Option<u64> {
        let heap = self.heap_bytes(memory_limit)?;
        let overhead = self.metaspace_bytes.unwrap_or(JVM_DEFAULT_METASPACE_BYTES)
            + self
                .code_cache_bytes
                .unwrap_or(JVM_DEFAULT_CODE_CACHE_BYTES)
            + JVM_THREADS * self.thread_stack_bytes.unwrap_or(JVM_DEFAULT_STACK_BYTES)
            + self.direct_memory_bytes.unwrap_or(0)
            + JVM_NATIVE_BYTES
            + (heap as f64 * JVM_HEAP_OVERHEAD_RATIO).ceil() as u64;
        Some(heap.saturating_add(overhead))
    }
}

/// The environment variables a JVM takes options from, lowest precedence first: the JVM reads
/// `JAVA_TOOL_OPTIONS` before its command line, the launcher puts `JDK_JAVA_OPTIONS` in front
/// of the command line, and start scripts append `JAVA_OPTS` to it. A later option wins.
pub const JVM_OPTION_VARIABLES: [&str; 3] = ["JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS", "JAVA_OPTS"];

/// A JVM size: digits with an optional `k`, `m`, `g` or `t` (either case, powers of 1024).
fn parse_jvm_size(option: &str, text: &str) -> Result<u64, RightsizingError> {
    let bad = |why| RightsizingError::JvmOption {
        option: option.to_string(),
        why,
    };
    let (digits, multiplier) = match text.char_indices().last() {
        None => return Err(bad("the size is missing")),
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_lowercase() {
                'k' => KIB,
                'm' => MIB,
                'g' => GIB,
                't' => 1024 * GIB,
                _ => return Err(bad("the size unit is not one of k, m, g, t")),
            };
            (&text[..i], m)
        }
        Some(_) => (text, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(
            "the size is not a whole number with an optional k, m, g or t",
        ));
    }
    let n: u64 = digits.parse().map_err(|_| bad("the size is too large"))?;
    let bytes = n
        .checked_mul(multiplier)
        .ok_or_else(|| bad("the size is too large"))?;
    if bytes == 0 {
        return Err(bad("the size is zero"));
    }
    Ok(bytes)
}

/// Reads the memory settings from one JVM options string (`-Xmx384m -Xss512k ...`). Options
/// that do not concern memory are skipped; the last of repeated options wins; `-Xmx` beats
/// `-XX:MaxRAMPercentage` whatever their order (as in the JVM). `Ok(None)` when no maximum
/// heap is set (the JVM then takes 25 % of the limit by itself and may never use it).
pub fn parse_jvm_options(options: &str) -> Result<Option<JvmMemory>, RightsizingError> {
    parse_jvm_tokens(options.split_whitespace())
}

/// Reads the memory settings from a container's environment (`NAME=VALUE` entries, as in an
/// OCI image config's `Env`), from the variables in [`JVM_OPTION_VARIABLES`].
pub fn jvm_memory_from_env<I, S>(env: I) -> Result<Option<JvmMemory>, RightsizingError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let env: Vec<S> = env.into_iter().collect();
    let mut tokens: Vec<String> = Vec::new();
    for name in JVM_OPTION_VARIABLES {
        // The last definition of a variable is the one the process sees.
        let value = env
            .iter()
            .filter_map(|e| e.as_ref().split_once('='))
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v)
            .last();
        if let Some(v) = value {
            tokens.extend(v.split_whitespace().map(str::to_string));
        }
    }
    parse_jvm_tokens(tokens.iter().map(String::as_str))
}

fn parse_jvm_tokens<'a>(
    tokens: impl Iterator<Item = &'a str>,
) -> Result<Option<JvmMemory>, RightsizingError> {
    let mut heap = None;
    let mut percent = None;
    let mut metaspace = None;
    let mut code_cache = None;
    let mut stack = None;
    let mut direct = None;
    for raw in tokens {
        let token = raw.trim_matches(|c| c == '"' || c == '\'');
        if let Some(v) = token.strip_prefix("-Xmx") {
            heap = Some(parse_jvm_size(token, v)?);
        } else if let Some(v) = token.strip_prefix("-XX:MaxHeapSize=") {
            heap = Some(parse_jvm_size(token, v)?);
        } else if let Some(v) = token.strip_prefix("-Xss") {
            stack = Some(parse_jvm_size(token, v)?);
        } else if let Some(v) = token.strip_prefix("-XX:MaxMetaspaceSize=") {
            metaspace = Some(parse_jvm_size(token, v)?);
        } else if let Some(v) = token.strip_prefix("-XX:ReservedCodeCacheSize=") {
            code_cache = Some(parse_jvm_size(token, v)?);
        } else if let Some(v) = token.strip_prefix("-XX:MaxDirectMemorySize=") {
            direct = Some(parse_jvm_size(token, v)?);
        } else if let Some(v) = token.strip_prefix("-XX:MaxRAMPercentage=") {
            let p: f64 = v.parse().map_err(|_| RightsizingError::JvmOption {
                option: token.to_string(),
                why: "the percentage is not a number",
            })?;
            if !(p.is_finite() && p > 0.0 && p <= 100.0) {
                return Err(RightsizingError::JvmOption {
                    option: token.to_string(),
                    why: "the percentage is not in (0, 100]",
                });
            }
            percent = Some(p);
        }
    }
    let heap = match (heap, percent) {
        (Some(b), _) => JvmHeap::Bytes(b),
        (None, Some(p)) => JvmHeap::PercentOfLimit(p),
        (None, None) => return Ok(None),
    };
    Ok(Some(JvmMemory {
        heap,
        metaspace_bytes: metaspace,
        code_cache_bytes: code_cache,
        thread_stack_bytes: stack,
        direct_memory_bytes: direct,
    }))
}

// ---------------------------------------------------------------------------------------------
// Per-container state and its recommendation
// ---------------------------------------------------------------------------------------------

/// Which container: the Kubernetes names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContainerKey {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl ContainerKey {
    pub fn new(namespace: &str, pod: &str, container: &str) -> ContainerKey {
        ContainerKey {
            namespace: namespace.to_string(),
            pod: pod.to_string(),
            container: container.to_string(),
        }
    }
}

/// One measurement of a container.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: SystemTime,
    /// CPU usage over the last sampling interval, in cores.
    pub cpu_cores: f64,
    /// Memory working set (usage minus inactive file pages), in bytes.
    pub memory_bytes: u64,
}

/// What the agent remembers of one container. Every time is ms since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerState {
    /// CPU usage samples, weight 1 each.
    cpu: DecayingHistogram,
    /// One sample per *closed* memory window: the window's peak, weight 1, at the peak's time.
    memory_peaks: DecayingHistogram,
    /// The open window: where it starts, its peak so far and when that was (no window before
    /// the first sample).
    window_start_ms: u64,
    window_peak_bytes: u64,
    window_peak_ms: u64,
    window_samples: u64,
    /// The highest working set ever sampled.
    peak_bytes: u64,
    oom_kills: u64,
    /// The highest memory at an OOM kill (0: unknown).
    memory_at_oom_bytes: u64,
    first_sample_ms: u64,
    last_sample_ms: u64,
    /// Last sample or OOM kill; retention counts from here.
    last_seen_ms: u64,
    samples: u64,
    memory_limit_bytes: Option<u64>,
    jvm: Option<JvmMemory>,
}

/// Why a recommended value is what it is, beyond the percentiles (in the JSON as snake_case
/// strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The CPU target is the CPU floor (usage is below it).
    CpuFloor,
    /// The memory target is the memory floor.
    MemoryFloor,
    /// The memory target was raised to the highest working set ever sampled.
    MemoryPeak,
    /// The memory target was raised after an OOM kill.
    OomKill,
    /// The memory target was raised to what the JVM's configured heap and overhead need.
    JvmHeap,
    /// Less than `upper_widening_days` of history: the bounds are wide.
    ShortHistory,
}

/// The recommendation for one container: the `containers[]` entries of
/// `GET /api/v1/recommendations` and `ragent recommend --json`. CPU in cores (rounded up to
/// the millicore), memory in bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerRecommendation {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// Usage samples taken.
    pub samples: u64,
    /// Seconds between the first and the last sample.
    pub history_seconds: f64,
    pub cpu_target_cores: f64,
    pub cpu_lower_cores: f64,
    pub cpu_upper_cores: f64,
    pub memory_target_bytes: u64,
    pub memory_lower_bytes: u64,
    pub memory_upper_bytes: u64,
    /// The highest working set ever sampled.
    pub memory_peak_bytes: u64,
    pub oom_kills: u64,
    /// The percentiles the recommendation started from (histogram bucket ends).
    pub cpu_p50_cores: f64,
    pub cpu_p90_cores: f64,
    pub cpu_p95_cores: f64,
    pub memory_p50_bytes: u64,
    pub memory_p90_bytes: u64,
    pub memory_p95_bytes: u64,
    /// What the JVM's settings need, when the image runs a JVM with a configured heap.
    pub jvm_floor_bytes: Option<u64>,
    pub reasons: Vec<Reason>,
}

/// `⌈x⌉` to the millicore (a hair of float noise below a whole millicore is not rounded up).
fn ceil_millicores(x: f64) -> f64 {
    (x * 1000.0 - 1e-6).ceil().max(0.0) / 1000.0
}

fn ceil_bytes(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 {
        0
    } else {
        // Float noise below a whole byte is not rounded up.
        (x - 1e-6).ceil().min(u64::MAX as f64) as u64
    }
}

impl ContainerState {
    pub fn new(config: &RightsizingConfig) -> ContainerState {
        ContainerState {
            cpu: DecayingHistogram::new(config.cpu_histogram),
            memory_peaks: DecayingHistogram::new(config.memory_histogram),
            window_start_ms: 0,
            window_peak_bytes: 0,
            window_peak_ms: 0,
            window_samples: 0,
            peak_bytes: 0,
            oom_kills: 0,
            memory_at_oom_bytes: 0,
            first_sample_ms: 0,
            last_sample_ms: 0,
            last_seen_ms: 0,
            samples: 0,
            memory_limit_bytes: None,
            jvm: None,
        }
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn oom_kills(&self) -> u64 {
        self.oom_kills
    }

    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes
    }

    pub fn last_seen(&self) -> SystemTime {
        from_unix_ms(self.last_seen_ms)
    }

    pub fn cpu_histogram(&self) -> &DecayingHistogram {
        &self.cpu
    }

    /// The memory peak histogram including the open window's peak so far.
    pub fn memory_histogram(&self) -> DecayingHistogram {
        let mut h = self.memory_peaks.clone();
        if self.window_samples > 0 {
            h.add(
                self.window_peak_bytes as f64,
                1.0,
                from_unix_ms(self.window_peak_ms),
            );
        }
        h
    }

    /// Records a sample. Windows are `memory_window_s` long, aligned to the first sample; a
    /// sample at or after the open window's end closes it (its peak goes into the memory
    /// histogram) and opens the window it falls in. A sample older than the open window counts
    /// in it (it only ever raises a peak).
    pub fn observe(&mut self, sample: &Sample, config: &RightsizingConfig) {
        let t = unix_ms(sample.at);
        let window_ms = config.memory_window_s.saturating_mul(1000);
        if self.samples == 0 {
            self.first_sample_ms = t;
            self.last_sample_ms = t;
            self.window_start_ms = t;
        } else if t >= self.window_start_ms.saturating_add(window_ms) {
            if self.window_samples > 0 {
                self.memory_peaks.add(
                    self.window_peak_bytes as f64,
                    1.0,
                    from_unix_ms(self.window_peak_ms),
                );
            }
            let windows = (t - self.window_start_ms) / window_ms;
            self.window_start_ms += windows * window_ms;
            self.window_peak_bytes = 0;
            self.window_peak_ms = t;
            self.window_samples = 0;
        }
        self.first_sample_ms = self.first_sample_ms.min(t);
        self.last_sample_ms = self.last_sample_ms.max(t);
        self.last_seen_ms = self.last_seen_ms.max(t);
        self.cpu.add(sample.cpu_cores.max(0.0), 1.0, sample.at);
        if self.window_samples == 0 || sample.memory_bytes > self.window_peak_bytes {
            self.window_peak_bytes = sample.memory_bytes;
            self.window_peak_ms = t;
        }
        self.window_samples += 1;
        self.peak_bytes = self.peak_bytes.max(sample.memory_bytes);
        self.samples += 1;
    }

    /// Records an OOM kill at `at`; `memory_bytes` is the working set at the kill when known.
    pub fn observe_oom(&mut self, at: SystemTime, memory_bytes: Option<u64>) {
        self.oom_kills += 1;
        self.memory_at_oom_bytes = self.memory_at_oom_bytes.max(memory_bytes.unwrap_or(0));
        self.last_seen_ms = self.last_seen_ms.max(unix_ms(at));
    }

    /// What the agent knows of the container besides usage: its memory limit and, for a JVM,
    /// the memory settings of its image.
    pub fn describe(&mut self, memory_limit_bytes: Option<u64>, jvm: Option<JvmMemory>) {
        self.memory_limit_bytes = memory_limit_bytes;
        self.jvm = jvm;
    }

    /// The memory the OOM bump starts from: the highest memory at a kill when known, else the
    /// container's memory limit (a cgroup kills at its limit), else the observed peak.
    fn oom_base_bytes(&self) -> u64 {
        if self.memory_at_oom_bytes > 0 {
            self.memory_at_oom_bytes
        } else {
            self.memory_limit_bytes
                .filter(|l| *l > 0)
                .unwrap_or(self.peak_bytes)
        }
    }

    /// The recommendation, `None` before the first sample. With `d` the history in days
    /// (`max(last sample − first sample, 60 s) / 86 400 s`), `m` the safety margin and `P·`
    /// histogram percentiles (the end of the bucket they fall in):
    ///
    /// ```text
    /// up = min(1 + U / d, max_upper_factor)          U = upper_widening_days (1)
    /// lo = d / (d + L)                               L = lower_widening_days (1/24)
    /// cpu_target = ⌈max(P90(cpu) × (1+m),           cpu_floor)⌉ₘ
    /// cpu_lower  = ⌈max(P50(cpu) × (1+m) × lo,      cpu_floor)⌉ₘ
    /// cpu_upper  = ⌈max(P95(cpu) × (1+m) × up,      cpu_floor)⌉ₘ
    /// hard       = max(memory_floor, oom_floor, jvm_floor)
    /// oom_floor  = max(B × oom_bump_ratio, B + oom_min_bump)   after an OOM kill, else 0
    /// memory_target = ⌈max(P90(peaks) × (1+m),      observed peak, hard)⌉
    /// memory_lower  = ⌈max(P50(peaks) × (1+m) × lo, hard)⌉
    /// memory_upper  = ⌈max(P95(peaks) × (1+m) × up, memory_target)⌉
    /// ```
    ///
    /// `⌈⌉ₘ` rounds up to the millicore, `⌈⌉` to the byte; `B` is the memory at the OOM kill
    /// (else the memory limit, else the observed peak). Finally lower ≤ target ≤ upper is
    /// enforced by lowering `lower` / raising `upper`.
    pub fn recommend(
        &self,
        key: &ContainerKey,
        config: &RightsizingConfig,
    ) -> Option<ContainerRecommendation> {
        if self.samples == 0 {
            return None;
        }
        let history_s = (self.last_sample_ms - self.first_sample_ms) as f64 / 1000.0;
        let d = history_s.max(60.0) / DAY_S;
        let up = (1.0 + config.upper_widening_days / d).min(config.max_upper_factor);
        let lo = d / (d + config.lower_widening_days);
        let margin = 1.0 + config.safety_margin;
        let mut reasons = Vec::new();

        let cpu_p = |p: f64| self.cpu.percentile(p).unwrap_or(0.0);
        let (c50, c90, c95) = (
            cpu_p(config.cpu_lower_percentile),
            cpu_p(config.cpu_target_percentile),
            cpu_p(config.cpu_upper_percentile),
        );
        let floor = config.cpu_floor_cores;
        let cpu_estimate = c90 * margin;
        if cpu_estimate < floor {
            reasons.push(Reason::CpuFloor);
        }
        let cpu_target = ceil_millicores(cpu_estimate.max(floor));
        let cpu_lower = ceil_millicores((c50 * margin * lo).max(floor)).min(cpu_target);
        let cpu_upper = ceil_millicores((c95 * margin * up).max(floor)).max(cpu_target);

        let memory = self.memory_histogram();
        let mem_p = |p: f64| memory.percentile(p).unwrap_or(0.0);
        let (m50, m90, m95) = (
            mem_p(config.memory_lower_percentile),
            mem_p(config.memory_target_percentile),
            mem_p(config.memory_upper_percentile),
        );
        let oom_floor = if self.oom_kills > 0 {
            let b = self.oom_base_bytes();
            ceil_bytes(b as f64 * config.oom_bump_ratio)
                .max(b.saturating_add(config.oom_min_bump_bytes))
        } else {
            0
        };
        let jvm_floor = self
            .jvm
            .as_ref()
            .and_then(|j| j.floor_bytes(self.memory_limit_bytes));
        let memory_estimate = ceil_bytes(m90 * margin);
        let raises = [
            (Reason::MemoryFloor, config.memory_floor_bytes),
            (Reason::MemoryPeak, self.peak_bytes),
            (Reason::OomKill, oom_floor),
            (Reason::JvmHeap, jvm_floor.unwrap_or(0)),
        ];
        for (reason, value) in raises {
            if value > memory_estimate {
                reasons.push(reason);
            }
        }
        let hard = config
            .memory_floor_bytes
            .max(oom_floor)
            .max(jvm_floor.unwrap_or(0));
        let memory_target = memory_estimate.max(self.peak_bytes).max(hard);
        let memory_lower = ceil_bytes(m50 * margin * lo).max(hard).min(memory_target);
        let memory_upper = ceil_bytes(m95 * margin * up).max(memory_target);
        if d < config.upper_widening_days {
            reasons.push(Reason::ShortHistory);
        }

        Some(ContainerRecommendation {
            namespace: key.namespace.clone(),
            pod: key.pod.clone(),
            container: key.container.clone(),
            samples: self.samples,
            history_seconds: history_s,
            cpu_target_cores: cpu_target,
            cpu_lower_cores: cpu_lower,
            cpu_upper_cores: cpu_upper,
            memory_target_bytes: memory_target,
            memory_lower_bytes: memory_lower,
            memory_upper_bytes: memory_upper,
            memory_peak_bytes: self.peak_bytes,
            oom_kills: self.oom_kills,
            cpu_p50_cores: c50,
            cpu_p90_cores: c90,
            cpu_p95_cores: c95,
            memory_p50_bytes: ceil_bytes(m50),
            memory_p90_bytes: ceil_bytes(m90),
            memory_p95_bytes: ceil_bytes(m95),
            jvm_floor_bytes: jvm_floor,
            reasons,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The node's containers, and checkpoints of them
// ---------------------------------------------------------------------------------------------

/// The right-sizing state of every container of the node.
#[derive(Debug, Clone)]
pub struct Recommender {
    config: RightsizingConfig,
    containers: BTreeMap<ContainerKey, ContainerState>,
}

/// The first bytes of a checkpoint. The header line is
/// `ragent-rightsizing <version> <sha256 of the body, hex> <body length>\n`, the body JSON.
pub const CHECKPOINT_MAGIC: &str = "ragent-rightsizing";
/// The checkpoint format this ragent writes and reads.
pub const CHECKPOINT_VERSION: u32 = 1;
/// A header line is never longer than this.
const MAX_HEADER: usize = 256;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointBody {
    written_at_ms: u64,
    containers: Vec<CheckpointEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointEntry {
    key: ContainerKey,
    state: ContainerState,
}

impl Recommender {
    pub fn new(config: RightsizingConfig) -> Result<Recommender, RightsizingError> {
        config.validate()?;
        Ok(Recommender {
            config,
            containers: BTreeMap::new(),
        })
    }

    pub fn config(&self) -> &RightsizingConfig {
        &self.config
    }

    pub fn len(&self) -> usize {
        self.containers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }

    pub fn get(&self, key: &ContainerKey) -> Option<&ContainerState> {
        self.containers.get(key)
    }

    fn entry(&mut self, key: &ContainerKey) -> &mut ContainerState {
        let config = &self.config;
        self.containers
            .entry(key.clone())
            .or_insert_with(|| ContainerState::new(config))
    }

    /// Records a sample of `key` (a container seen for the first time starts its history).
    pub fn observe(&mut self, key: &ContainerKey, sample: &Sample) {
        let config = self.config.clone();
        self.entry(key).observe(sample, &config);
    }

    /// Records an OOM kill of `key`.
    pub fn observe_oom(&mut self, key: &ContainerKey, at: SystemTime, memory_bytes: Option<u64>) {
        self.entry(key).observe_oom(at, memory_bytes);
    }

    /// Sets the memory limit and JVM settings of `key`.
    pub fn describe(
        &mut self,
        key: &ContainerKey,
        memory_limit_bytes: Option<u64>,
        jvm: Option<JvmMemory>,
    ) {
        self.entry(key).describe(memory_limit_bytes, jvm);
    }

    /// Forgets containers not seen (no sample, no OOM kill) for longer than the retention;
    /// returns them.
    pub fn expire(&mut self, now: SystemTime) -> Vec<ContainerKey> {
        let horizon = unix_ms(now).saturating_sub(self.config.retention_s.saturating_mul(1000));
        let gone: Vec<ContainerKey> = self
            .containers
            .iter()
            .filter(|(_, s)| s.last_seen_ms < horizon)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.containers.remove(k);
        }
        gone
    }

    pub fn recommendation(&self, key: &ContainerKey) -> Option<ContainerRecommendation> {
        self.containers.get(key)?.recommend(key, &self.config)
    }

    /// Recommendations of every container with at least one sample, ordered by namespace, pod,
    /// container.
    pub fn recommendations(&self) -> Vec<ContainerRecommendation> {
        self.containers
            .iter()
            .filter_map(|(k, s)| s.recommend(k, &self.config))
            .collect()
    }

    /// The checkpoint bytes: a header line with magic, version, sha256 and length of the body,
    /// then the body (JSON of every container's state).
    pub fn checkpoint(&self, now: SystemTime) -> Vec<u8> {
        let body = CheckpointBody {
            written_at_ms: unix_ms(now),
            containers: self
                .containers
                .iter()
                .map(|(k, s)| CheckpointEntry {
                    key: k.clone(),
                    state: s.clone(),
                })
                .collect(),
        };
        // Serializing plain structs of numbers and strings cannot fail.
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let sum = hex(&Sha256::digest(&body));
        let mut out = format!(
            "{CHECKPOINT_MAGIC} {CHECKPOINT_VERSION} {sum} {}\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// A recommender from checkpoint bytes, containers past the retention at `now` dropped.
    /// Histograms keep the layout they were written with.
    pub fn restore(
        config: RightsizingConfig,
        bytes: &[u8],
        now: SystemTime,
    ) -> Result<Recommender, RightsizingError> {
        let mut r = Recommender::new(config)?;
        let body = parse_checkpoint(bytes)?;
        for e in body.containers {
            r.containers.insert(e.key, e.state);
        }
        r.expire(now);
        Ok(r)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_checkpoint(bytes: &[u8]) -> Result<CheckpointBody, RightsizingError> {
    let magic = CHECKPOINT_MAGIC.as_bytes();
    let prefix = &bytes[..bytes.len().min(magic.len())];
    if bytes.is_empty() || !magic.starts_with(prefix) {
        return Err(RightsizingError::NotACheckpoint);
    }
    let Some(nl) = bytes.iter().take(MAX_HEADER).position(|b| *b == b'\n') else {
        return if bytes.len() < MAX_HEADER {
            Err(RightsizingError::Truncated {
                expected: MAX_HEADER as u64,
                found: bytes.len() as u64,
            })
        } else {
            Err(RightsizingError::Corrupt {
                what: "the header line has no end",
            })
        };
    };
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| RightsizingError::Corrupt {
        what: "the header is not text",
    })?;
    let fields: Vec<&str> = header.split(' ').collect();
    if fields.first() != Some(&CHECKPOINT_MAGIC) {
        return Err(RightsizingError::NotACheckpoint);
    }
    let version = fields.get(1).copied().unwrap_or("");
    if version != CHECKPOINT_VERSION.to_string() {
        return Err(RightsizingError::UnsupportedVersion {
            found: version.to_string(),
            supported: CHECKPOINT_VERSION,
        });
    }
    let [_, _, sum, len] = fields[..] else {
        return Err(RightsizingError::Corrupt {
            what: "the header does not have four fields",
        });
    };
    let len: u64 = len.parse().map_err(|_| RightsizingError::Corrupt {
        what: "the body length in the header is not a number",
    })?;
    let body = &bytes[nl + 1..];
    if (body.len() as u64) < len {
        return Err(RightsizingError::Truncated {
            expected: (nl + 1) as u64 + len,
            found: bytes.len() as u64,
        });
    }
    if body.len() as u64 > len {
        return Err(RightsizingError::Corrupt {
            what: "there are bytes after the body",
        });
    }
    let found = hex(&Sha256::digest(body));
    if found != sum {
        return Err(RightsizingError::ChecksumMismatch {
            expected: sum.to_string(),
            found,
        });
    }
    serde_json::from_slice(body).map_err(|source| RightsizingError::CorruptBody { source })
}

// ---------------------------------------------------------------------------------------------
// Node instance-shape advice
// ---------------------------------------------------------------------------------------------

/// One machine shape of the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceType {
    pub name: String,
    pub vcpu: u32,
    pub memory_bytes: u64,
    /// Price per hour, in the catalog's currency.
    pub hourly_price: f64,
}

/// The catalog file (TOML): `currency` (optional, informative) and `[[instance_type]]` tables
/// with `name`, `vcpu`, `memory_gib` and `hourly_price`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Catalog {
    pub currency: Option<String>,
    pub instance_types: Vec<InstanceType>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    currency: Option<String>,
    #[serde(default)]
    instance_type: Vec<CatalogFileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFileEntry {
    name: String,
    vcpu: u32,
    memory_gib: f64,
    hourly_price: f64,
}

impl Catalog {
    /// Parses and checks a catalog: names unique and non-empty, vCPU and memory above zero,
    /// prices finite and not negative, at least one entry.
    pub fn parse(text: &str) -> Result<Catalog, RightsizingError> {
        let file: CatalogFile =
            toml::from_str(text).map_err(|source| RightsizingError::CatalogToml { source })?;
        let mut types: Vec<InstanceType> = Vec::new();
        for e in file.instance_type {
            let bad = |why| RightsizingError::CatalogEntry {
                name: e.name.clone(),
                why,
            };
            if e.name.trim().is_empty() {
                return Err(bad("the name is empty"));
            }
            if types.iter().any(|t| t.name == e.name) {
                return Err(bad("the name appears twice"));
            }
            if e.vcpu == 0 {
                return Err(bad("vcpu must be at least 1"));
            }
            if !(e.memory_gib.is_finite() && e.memory_gib > 0.0) {
                return Err(bad("memory_gib must be a positive number"));
            }
            if !(e.hourly_price.is_finite() && e.hourly_price >= 0.0) {
                return Err(bad("hourly_price must be a number ≥ 0"));
            }
            types.push(InstanceType {
                name: e.name,
                vcpu: e.vcpu,
                memory_bytes: (e.memory_gib * GIB as f64).round() as u64,
                hourly_price: e.hourly_price,
            });
        }
        if types.is_empty() {
            return Err(RightsizingError::CatalogEmpty);
        }
        Ok(Catalog {
            currency: file.currency,
            instance_types: types,
        })
    }

    /// The catalog entry a node of this capacity is: the same number of vCPUs and a memory
    /// capacity between 85 % and 105 % of the entry's (the kernel and firmware keep some of
    /// the nominal memory), the closest memory if several match.
    pub fn match_capacity(&self, cpu_cores: f64, memory_bytes: u64) -> Option<&InstanceType> {
        let m = memory_bytes as f64;
        self.instance_types
            .iter()
            .filter(|t| (t.vcpu as f64 - cpu_cores).abs() < 0.01)
            .filter(|t| {
                let nominal = t.memory_bytes as f64;
                m >= nominal * CAPACITY_MATCH_LOW && m <= nominal * CAPACITY_MATCH_HIGH
            })
            .min_by(|a, b| {
                let da = (a.memory_bytes as f64 - m).abs();
                let db = (b.memory_bytes as f64 - m).abs();
                da.total_cmp(&db).then_with(|| a.name.cmp(&b.name))
            })
    }
}

/// A node's memory capacity matches a catalog entry from this fraction of its nominal memory…
pub const CAPACITY_MATCH_LOW: f64 = 0.85;
/// … up to this fraction.
pub const CAPACITY_MATCH_HIGH: f64 = 1.05;

/// What a node must offer beyond the sum of its containers' recommended requests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Headroom {
    /// Added to the sum of requests: 0.15 is +15 %. Default 0.15.
    pub fraction: f64,
    /// For the OS, kubelet, containerd and ragent: default 0.2 cores …
    pub system_reserved_cpu_cores: f64,
    /// … and 1 GiB (which includes kubelet's eviction threshold).
    pub system_reserved_memory_bytes: u64,
}

impl Default for Headroom {
    fn default() -> Headroom {
        Headroom {
            fraction: 0.15,
            system_reserved_cpu_cores: 0.2,
            system_reserved_memory_bytes: GIB,
        }
    }
}

/// The advice for one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeAdvice {
    /// `Σ cpu_target × (1 + fraction) + reserved cpu`.
    pub needed_cpu_cores: f64,
    /// `⌈Σ memory_target × (1 + fraction)⌉ + reserved memory`.
    pub needed_memory_bytes: u64,
    /// The cheapest shape with at least the needed vCPUs and memory (ties: fewer vCPUs, then
    /// less memory, then name); `None` when no shape is big enough.
    pub recommended: Option<InstanceType>,
    /// The node's own shape, when its capacity matches a catalog entry.
    pub current: Option<InstanceType>,
    /// `(current price − recommended price) / current price × 100`; negative when the node is
    /// too small for what its containers need. `None` without both shapes or at price 0.
    pub saving_percent: Option<f64>,
}

/// Picks the cheapest shape for the containers' recommended targets.
pub fn advise_shape(
    catalog: &Catalog,
    recommendations: &[ContainerRecommendation],
    headroom: &Headroom,
    node_capacity: Option<(f64, u64)>,
) -> ShapeAdvice {
    let cpu: f64 = recommendations.iter().map(|r| r.cpu_target_cores).sum();
    let memory: u64 = recommendations.iter().map(|r| r.memory_target_bytes).sum();
    let needed_cpu = cpu * (1.0 + headroom.fraction) + headroom.system_reserved_cpu_cores;
    let needed_memory = ceil_bytes(memory as f64 * (1.0 + headroom.fraction))
        .saturating_add(headroom.system_reserved_memory_bytes);
    let recommended = catalog
        .instance_types
        .iter()
        .filter(|t| t.vcpu as f64 + 1e-9 >= needed_cpu && t.memory_bytes >= needed_memory)
        .min_by(|a, b| {
            a.hourly_price
                .total_cmp(&b.hourly_price)
                .then(a.vcpu.cmp(&b.vcpu))
                .then(a.memory_bytes.cmp(&b.memory_bytes))
                .then_with(|| a.name.cmp(&b.name))
        })
        .cloned();
    let current = node_capacity
        .and_then(|(c, m)| catalog.match_capacity(c, m))
        .cloned();
    let saving_percent = match (&current, &recommended) {
        (Some(c), Some(r)) if c.hourly_price > 0.0 => {
            Some((c.hourly_price - r.hourly_price) / c.hourly_price * 100.0)
        }
        _ => None,
    };
    ShapeAdvice {
        needed_cpu_cores: needed_cpu,
        needed_memory_bytes: needed_memory,
        recommended,
        current,
        saving_percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE_CATALOG: &str = include_str!("../../../deploy/catalog/instance-types.toml");

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
    }

    fn key(c: &str) -> ContainerKey {
        ContainerKey::new("shop", "web-1", c)
    }

    /// Samples every `step` seconds from 0 to `until` inclusive.
    fn feed(r: &mut Recommender, k: &ContainerKey, until: u64, step: u64, cpu: f64, mem: u64) {
        let mut s = 0;
        while s <= until {
            r.observe(
                k,
                &Sample {
                    at: t(s),
                    cpu_cores: cpu,
                    memory_bytes: mem,
                },
            );
            s += step;
        }
    }

    fn rec(config: RightsizingConfig) -> Recommender {
        Recommender::new(config).expect("valid config")
    }

    // --- histogram layout -------------------------------------------------------------------

    #[test]
    fn bucket_layout_by_hand() {
        let o = HistogramOptions::CPU;
        assert_eq!(o.bucket_start(0), 0.0);
        assert!((o.bucket_start(1) - 0.01).abs() < 1e-12);
        assert!((o.bucket_start(2) - 0.0205).abs() < 1e-12);
        assert_eq!(o.bucket_of(0.0), 0);
        assert_eq!(o.bucket_of(0.0099), 0);
        assert_eq!(o.bucket_of(0.01), 1);
        assert_eq!(o.bucket_of(-3.0), 0);
        // 0.5 cores: 0.2 × (1.05^i − 1) ≤ 0.5 ⇔ i ≤ ln 3.5 / ln 1.05 = 25.7.
        assert_eq!(o.bucket_of(0.5), 25);
        // Values beyond max_value count in the last bucket.
        assert_eq!(o.bucket_of(1e9), o.buckets() - 1);
        assert_eq!(o.bucket_of(o.max_value), o.buckets() - 1);
        assert!(o.bucket_start(o.buckets() - 1) <= o.max_value);
        assert!(o.bucket_end(o.buckets() - 1) > o.max_value);
        let m = HistogramOptions::MEMORY;
        // 200 MiB: 20 MiB × (1.05^i − 1) ≤ 200 MiB ⇔ i ≤ ln 11 / ln 1.05 = 49.1.
        assert_eq!(m.bucket_of((200 * MIB) as f64), 49);
        // The bucket counts docs/rightsizing.md gives.
        assert_eq!(o.buckets(), 175);
        assert_eq!(m.buckets(), 223);
    }

    #[test]
    fn bad_layouts_are_refused() {
        let mut o = HistogramOptions::CPU;
        o.ratio = 1.0;
        assert!(o.validate("x").is_err());
        let mut o = HistogramOptions::CPU;
        o.ratio = 1.000_000_1;
        assert!(o.validate("x").is_err(), "too many buckets");
        let mut o = HistogramOptions::CPU;
        o.half_life_s = 0.0;
        assert!(o.validate("x").is_err());
        let mut o = HistogramOptions::CPU;
        o.max_value = 0.001;
        assert!(o.validate("x").is_err());
    }

    #[test]
    fn empty_histogram_has_no_percentile() {
        let h = DecayingHistogram::new(HistogramOptions::CPU);
        assert!(h.is_empty());
        assert_eq!(h.percentile(0.9), None);
        assert_eq!(h.total_weight(), 0.0);
    }

    #[test]
    fn percentile_is_the_end_of_the_bucket() {
        let mut h = DecayingHistogram::new(HistogramOptions::CPU);
        for v in [0.1, 0.2, 0.3, 0.4, 1.0] {
            h.add(v, 1.0, t(0));
        }
        let o = HistogramOptions::CPU;
        assert_eq!(h.percentile(0.5), Some(o.bucket_end(o.bucket_of(0.3))));
        assert_eq!(h.percentile(0.8), Some(o.bucket_end(o.bucket_of(0.4))));
        assert_eq!(h.percentile(0.81), Some(o.bucket_end(o.bucket_of(1.0))));
        assert_eq!(h.percentile(0.0), Some(o.bucket_end(o.bucket_of(0.1))));
        assert_eq!(h.total_weight(), 5.0);
        // Junk is ignored.
        h.add(f64::NAN, 1.0, t(0));
        h.add(1.0, -1.0, t(0));
        h.add(1.0, f64::INFINITY, t(0));
        assert_eq!(h.total_weight(), 5.0);
    }

    #[test]
    fn weights_halve_per_half_life() {
        let mut h = DecayingHistogram::new(HistogramOptions::CPU);
        h.add(0.1, 1.0, t(0));
        h.add(1.0, 1.0, t(86_400));
        // As seen at the second sample: 0.5 + 1.
        assert!((h.total_weight_at(t(86_400)) - 1.5).abs() < 1e-9);
        // A third of the weight is the old sample's: P30 is in its bucket, P34 in the new one.
        let o = HistogramOptions::CPU;
        assert_eq!(h.percentile(0.33), Some(o.bucket_end(o.bucket_of(0.1))));
        assert_eq!(h.percentile(0.34), Some(o.bucket_end(o.bucket_of(1.0))));
    }

    #[test]
    fn a_year_of_samples_renormalizes_without_overflow() {
        let mut h = DecayingHistogram::new(HistogramOptions::CPU);
        for day in 0..365u64 {
            h.add(0.5, 1.0, t(day * 86_400));
        }
        assert!(h.total_weight().is_finite());
        assert!(h.weights.iter().all(|w| w.is_finite()));
        // Seen from the last day: 1 + 1/2 + 1/4 + … ≈ 2.
        assert!((h.total_weight_at(t(364 * 86_400)) - 2.0).abs() < 1e-6);
        assert!(
            h.reference_ms > unix_ms(t(0)),
            "the reference moved forward"
        );
    }

    #[test]
    fn merging_needs_the_same_layout() {
        let mut a = DecayingHistogram::new(HistogramOptions::CPU);
        let b = DecayingHistogram::new(HistogramOptions::MEMORY);
        assert!(matches!(
            a.merge(&b),
            Err(RightsizingError::IncompatibleHistograms)
        ));
    }

    // --- recommendations --------------------------------------------------------------------

    #[test]
    fn steady_container_two_days_by_hand() {
        // 0.5 cores and 200 MiB, every 15 s for 2 days: d = 2, up = 1 + 1/2, lo = 2 / (2 + 1/24).
        let mut r = rec(RightsizingConfig::default());
        let k = key("app");
        feed(&mut r, &k, 2 * 86_400, 15, 0.5, 200 * MIB);
        let x = r.recommendation(&k).expect("a recommendation");
        assert_eq!(x.samples, 2 * 86_400 / 15 + 1);
        assert_eq!(x.history_seconds, 172_800.0);
        // CPU: every sample in bucket 25, which ends at 0.2 × (1.05^26 − 1) = 0.511134.
        let end = 0.2 * (1.05f64.powi(26) - 1.0);
        assert!((end - 0.511_134).abs() < 1e-6);
        assert_eq!(x.cpu_p90_cores, x.cpu_p50_cores);
        assert!((x.cpu_p90_cores - end).abs() < 1e-12);
        assert_eq!(x.cpu_target_cores, 0.588); // 0.511134 × 1.15 = 0.58780
        assert_eq!(x.cpu_upper_cores, 0.882); // × 1.5 = 0.88171
        assert_eq!(x.cpu_lower_cores, 0.576); // × 48/49 = 0.57579
        // Memory: three window peaks (two closed days, one just opened) of 200 MiB in bucket
        // 49, which ends at 20 MiB × (1.05^50 − 1) = 209.35 MiB.
        let end = MIB as f64 * (1.05f64.powi(50) - 1.0) / 0.05;
        assert_eq!(x.memory_p90_bytes, ceil_bytes(end));
        assert_eq!(x.memory_target_bytes, ceil_bytes(end * (1.0 + 0.15)));
        assert!((x.memory_target_bytes as f64 / MIB as f64 - 240.75).abs() < 0.01);
        assert_eq!(x.memory_upper_bytes, ceil_bytes(end * (1.0 + 0.15) * 1.5));
        let d = 2.0;
        assert_eq!(
            x.memory_lower_bytes,
            ceil_bytes(end * (1.0 + 0.15) * (d / (d + 1.0 / 24.0)))
        );
        assert_eq!(x.memory_peak_bytes, 200 * MIB);
        assert_eq!(x.oom_kills, 0);
        assert!(x.reasons.is_empty(), "{:?}", x.reasons);
        assert_eq!(x.jvm_floor_bytes, None);
    }

    #[test]
    fn short_history_widens_the_bounds() {
        // One hour: d = 1/24, up = min(1 + 24, 10) = 10, lo = (1/24) / (2/24) = 0.5.
        let mut r = rec(RightsizingConfig::default());
        let k = key("app");
        feed(&mut r, &k, 3600, 15, 0.5, 200 * MIB);
        let x = r.recommendation(&k).expect("a recommendation");
        let end = 0.2 * (1.05f64.powi(26) - 1.0);
        assert_eq!(x.cpu_target_cores, 0.588);
        assert_eq!(x.cpu_upper_cores, ceil_millicores(end * 1.15 * 10.0)); // 5.878 → 5.879
        assert_eq!(x.cpu_upper_cores, 5.879);
        assert_eq!(x.cpu_lower_cores, 0.294); // 0.58780 × 0.5 = 0.29390
        assert_eq!(x.reasons, vec![Reason::ShortHistory]);
        // A single sample counts as 60 s of history: up capped at 10, lo = (1/1440)/(1/1440 + 1/24).
        let mut r = rec(RightsizingConfig::default());
        feed(&mut r, &k, 0, 15, 0.5, 200 * MIB);
        let x = r.recommendation(&k).expect("a recommendation");
        assert_eq!(x.samples, 1);
        assert_eq!(x.cpu_upper_cores, 5.879);
        let lo = (1.0 / 1440.0) / (1.0 / 1440.0 + 1.0 / 24.0);
        assert_eq!(x.cpu_lower_cores, ceil_millicores(end * 1.15 * lo)); // 0.00964 → 0.01 (floor)
        assert_eq!(x.cpu_lower_cores, 0.01);
    }

    #[test]
    fn floors_apply_and_say_so() {
        let config = RightsizingConfig {
            cpu_floor_cores: 0.1,
            ..RightsizingConfig::default()
        };
        let mut r = rec(config);
        let k = key("idle");
        feed(&mut r, &k, 2 * 86_400, 60, 0.001, 5 * MIB);
        let x = r.recommendation(&k).expect("a recommendation");
        assert_eq!(x.cpu_target_cores, 0.1);
        assert_eq!(x.cpu_lower_cores, 0.1);
        assert_eq!(x.cpu_upper_cores, 0.1);
        // 5 MiB peaks: bucket 4 ends at 5.53 MiB, × 1.15 = 6.35 MiB < 20 MiB.
        assert_eq!(x.memory_target_bytes, 20 * MIB);
        assert_eq!(x.memory_lower_bytes, 20 * MIB);
        assert_eq!(x.memory_upper_bytes, 20 * MIB);
        assert_eq!(x.reasons, vec![Reason::CpuFloor, Reason::MemoryFloor]);
    }

    #[test]
    fn memory_never_below_the_observed_peak() {
        // 20 one-minute windows of 100 MiB, one of them with a 500 MiB spike: P90 of the peaks
        // stays at 100 MiB's bucket, the target is the spike.
        let config = RightsizingConfig {
            memory_window_s: 60,
            ..RightsizingConfig::default()
        };
        let mut r = rec(config);
        let k = key("spiky");
        for s in (0..=20 * 60).step_by(10) {
            let mem = if s == 7 * 60 { 500 * MIB } else { 100 * MIB };
            r.observe(
                &k,
                &Sample {
                    at: t(s),
                    cpu_cores: 0.2,
                    memory_bytes: mem,
                },
            );
        }
        let x = r.recommendation(&k).expect("a recommendation");
        let bucket_100 = HistogramOptions::MEMORY.bucket_of((100 * MIB) as f64);
        assert_eq!(
            x.memory_p90_bytes,
            ceil_bytes(HistogramOptions::MEMORY.bucket_end(bucket_100))
        );
        assert_eq!(x.memory_target_bytes, 500 * MIB);
        assert!(x.memory_upper_bytes >= x.memory_target_bytes);
        assert!(x.reasons.contains(&Reason::MemoryPeak));
    }

    #[test]
    fn oom_kill_raises_memory() {
        let mut r = rec(RightsizingConfig::default());
        let k = key("leaky");
        feed(&mut r, &k, 2 * 86_400, 60, 0.1, 200 * MIB);
        let before = r
            .recommendation(&k)
            .expect("a recommendation")
            .memory_target_bytes;
        // Killed at 300 MiB: max(300 × 1.2, 300 + 100) = 400 MiB.
        r.observe_oom(&k, t(2 * 86_400 + 1), Some(300 * MIB));
        let x = r.recommendation(&k).expect("a recommendation");
        assert!(before < 400 * MIB);
        assert_eq!(x.memory_target_bytes, 400 * MIB);
        assert_eq!(
            x.memory_lower_bytes,
            400 * MIB,
            "the lower bound respects the kill too"
        );
        assert!(x.memory_upper_bytes >= 400 * MIB);
        assert_eq!(x.oom_kills, 1);
        assert_eq!(x.reasons, vec![Reason::OomKill]);
        // Killed at 1 GiB: max(1.2 GiB, 1 GiB + 100 MiB) = 1.2 GiB = ⌈1 288 490 188.8⌉.
        r.observe_oom(&k, t(2 * 86_400 + 2), Some(GIB));
        let x = r.recommendation(&k).expect("a recommendation");
        assert_eq!(x.memory_target_bytes, 1_288_490_189);
        assert_eq!(x.oom_kills, 2);
    }

    #[test]
    fn oom_without_the_memory_at_the_kill_uses_the_limit_then_the_peak() {
        let mut r = rec(RightsizingConfig::default());
        let k = key("a");
        feed(&mut r, &k, 86_400, 60, 0.1, 200 * MIB);
        r.describe(&k, Some(256 * MIB), None);
        r.observe_oom(&k, t(86_401), None);
        // max(256 × 1.2, 256 + 100) = 356 MiB.
        assert_eq!(
            r.recommendation(&k).map(|x| x.memory_target_bytes),
            Some(356 * MIB)
        );
        let k2 = key("b");
        feed(&mut r, &k2, 86_400, 60, 0.1, 200 * MIB);
        r.observe_oom(&k2, t(86_401), None);
        assert_eq!(
            r.recommendation(&k2).map(|x| x.memory_target_bytes),
            Some(300 * MIB)
        );
    }

    #[test]
    fn oom_before_any_sample_gives_no_recommendation_yet() {
        let mut r = rec(RightsizingConfig::default());
        let k = key("crashy");
        r.observe_oom(&k, t(0), Some(100 * MIB));
        assert_eq!(r.recommendation(&k), None);
        feed(&mut r, &k, 60, 15, 0.1, 50 * MIB);
        let x = r.recommendation(&k).expect("a recommendation");
        assert_eq!(x.memory_target_bytes, 200 * MIB);
        assert_eq!(x.oom_kills, 1);
    }

    #[test]
    fn empty_history_gives_nothing() {
        let mut r = rec(RightsizingConfig::default());
        let k = key("new");
        r.describe(&k, Some(GIB), parse_jvm_options("-Xmx512m").expect("valid"));
        assert_eq!(r.len(), 1);
        assert_eq!(r.recommendation(&k), None);
        assert!(r.recommendations().is_empty());
        assert_eq!(r.recommendation(&key("never-seen")), None);
    }

    #[test]
    fn jvm_heap_floor_applies_and_says_so() {
        let mut r = rec(RightsizingConfig::default());
        let k = key("spring");
        feed(&mut r, &k, 2 * 86_400, 60, 0.3, 200 * MIB);
        let jvm = jvm_memory_from_env(["PATH=/bin", "JAVA_TOOL_OPTIONS=-Xmx384m"]).expect("valid");
        r.describe(&k, None, jvm);
        let x = r.recommendation(&k).expect("a recommendation");
        assert_eq!(x.jvm_floor_bytes, Some(659_764_020));
        assert_eq!(x.memory_target_bytes, 659_764_020);
        assert_eq!(x.memory_lower_bytes, 659_764_020);
        assert!(x.reasons.contains(&Reason::JvmHeap));
        // A percentage without a known limit gives no floor.
        r.describe(
            &k,
            None,
            parse_jvm_options("-XX:MaxRAMPercentage=75").expect("valid"),
        );
        let x = r.recommendation(&k).expect("a recommendation");
        assert_eq!(x.jvm_floor_bytes, None);
        assert!(!x.reasons.contains(&Reason::JvmHeap));
    }

    #[test]
    fn jvm_floors_by_hand() {
        let floor = |opts: &str, limit| {
            parse_jvm_options(opts)
                .expect("valid")
                .expect("a heap")
                .floor_bytes(limit)
        };
        // 384 MiB + 96 + 48 + 50 × 1 + 32 MiB + ⌈5 % × 384 MiB⌉ = 639 631 360 + 20 132 660.
        assert_eq!(floor("-Xmx384m", None), Some(659_764_020));
        // 2 GiB + 226 MiB + ⌈107 374 182.4⌉.
        assert_eq!(floor("-Xmx2g", None), Some(2_491_836_007));
        assert_eq!(floor("-XX:MaxHeapSize=2G", None), Some(2_491_836_007));
        // 75 % of 1 GiB = 805 306 368, + 226 MiB + ⌈40 265 318.4⌉.
        assert_eq!(
            floor("-XX:MaxRAMPercentage=75", Some(GIB)),
            Some(1_082_549_863)
        );
        assert_eq!(floor("-XX:MaxRAMPercentage=75.0", None), None);
        // 1 GiB + metaspace 128 + code 48 + 50 × 512 KiB + 32 MiB + ⌈53 687 091.2⌉.
        assert_eq!(
            floor("-Xss512k -XX:MaxMetaspaceSize=128m -Dx=y -Xmx1g", None),
            Some(1_371_747_124)
        );
        // Direct memory adds in full.
        assert_eq!(
            floor(
                "-Xmx384m -XX:MaxDirectMemorySize=64m -XX:ReservedCodeCacheSize=48m",
                None
            ),
            Some(659_764_020 + 64 * MIB)
        );
    }

    #[test]
    fn jvm_option_precedence() {
        let heap = |opts: &str| parse_jvm_options(opts).expect("valid").map(|j| j.heap);
        assert_eq!(heap("-Xmx256m -Xmx512m"), Some(JvmHeap::Bytes(512 * MIB)));
        assert_eq!(
            heap("-Xmx256m -XX:MaxRAMPercentage=50"),
            Some(JvmHeap::Bytes(256 * MIB))
        );
        assert_eq!(
            heap("-XX:MaxRAMPercentage=50 -Xmx256m"),
            Some(JvmHeap::Bytes(256 * MIB))
        );
        assert_eq!(
            heap("-XX:MaxRAMPercentage=50"),
            Some(JvmHeap::PercentOfLimit(50.0))
        );
        assert_eq!(heap("'-Xmx1024k'"), Some(JvmHeap::Bytes(MIB)));
        assert_eq!(heap("-Xmx1073741824"), Some(JvmHeap::Bytes(GIB)));
        assert_eq!(heap("-Xss1m -Dfoo=bar -jar app.jar"), None);
        assert_eq!(heap(""), None);
        // Environment: JAVA_OPTS after JDK_JAVA_OPTIONS after JAVA_TOOL_OPTIONS; the last
        // definition of a variable counts.
        let env = |e: &[&str]| jvm_memory_from_env(e).expect("valid").map(|j| j.heap);
        assert_eq!(
            env(&["JAVA_OPTS=-Xmx512m", "JAVA_TOOL_OPTIONS=-Xmx256m"]),
            Some(JvmHeap::Bytes(512 * MIB))
        );
        assert_eq!(
            env(&["JDK_JAVA_OPTIONS=-Xmx1g", "JAVA_TOOL_OPTIONS=-Xmx256m"]),
            Some(JvmHeap::Bytes(GIB))
        );
        assert_eq!(
            env(&["JAVA_TOOL_OPTIONS=-Xmx256m", "JAVA_TOOL_OPTIONS=-Xmx128m"]),
            Some(JvmHeap::Bytes(128 * MIB))
        );
        assert_eq!(
            env(&["JAVA_OPTS=-Dspring.profiles.active=prod", "PATH=/bin"]),
            None
        );
        assert_eq!(
            env(&["NOT_JAVA_OPTS=-Xmx1g", "JAVA_TOOL_OPTIONSX=-Xmx1g"]),
            None
        );
    }

    #[test]
    fn bad_jvm_options_are_errors() {
        for bad in [
            "-Xmx",
            "-Xmx12q",
            "-Xmxabc",
            "-Xmx1.5g",
            "-Xmx0",
            "-Xmx-1g",
            "-Xmx99999999999999999999g",
            "-Xmx99999999999t",
            "-XX:MaxRAMPercentage=abc",
            "-XX:MaxRAMPercentage=150",
            "-XX:MaxRAMPercentage=0",
            "-XX:MaxRAMPercentage=NaN",
            "-Xss",
            "-XX:MaxMetaspaceSize=lots",
        ] {
            let e = parse_jvm_options(&format!("-Dok=1 {bad}")).expect_err(bad);
            assert!(
                matches!(e, RightsizingError::JvmOption { .. }),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains(bad), "{e}");
            assert_eq!(e.metric_label(), "jvm_option");
        }
        assert!(jvm_memory_from_env(["JAVA_TOOL_OPTIONS=-Xmx1z"]).is_err());
    }

    // --- containers that come and go, checkpoints ------------------------------------------

    #[test]
    fn containers_that_vanish_are_dropped_after_the_retention() {
        let mut r = rec(RightsizingConfig::default());
        let (a, b) = (key("a"), key("b"));
        feed(&mut r, &a, 3600, 60, 0.1, 50 * MIB);
        feed(&mut r, &b, 3600, 60, 0.1, 50 * MIB);
        // b keeps running, a is gone.
        r.observe(
            &b,
            &Sample {
                at: t(6 * 86_400),
                cpu_cores: 0.1,
                memory_bytes: 50 * MIB,
            },
        );
        assert!(
            r.expire(t(7 * 86_400)).is_empty(),
            "a was seen 7 days − 1 h ago"
        );
        assert_eq!(r.expire(t(7 * 86_400 + 3601)), vec![a.clone()]);
        assert_eq!(r.get(&a), None);
        assert!(r.get(&b).is_some());
        assert_eq!(r.recommendations().len(), 1);
        // An OOM kill counts as being seen.
        r.observe_oom(&b, t(13 * 86_400), None);
        assert!(r.expire(t(13 * 86_400 + 1)).is_empty());
    }

    #[test]
    fn a_container_that_comes_back_keeps_its_history() {
        let mut r = rec(RightsizingConfig::default());
        let k = key("restarted");
        feed(&mut r, &k, 3600, 60, 0.1, 50 * MIB);
        let later = 3 * 86_400;
        r.observe(
            &k,
            &Sample {
                at: t(later),
                cpu_cores: 0.1,
                memory_bytes: 50 * MIB,
            },
        );
        let x = r.recommendation(&k).expect("a recommendation");
        assert_eq!(x.samples, 62);
        assert_eq!(x.history_seconds, later as f64);
        assert!(!x.reasons.contains(&Reason::ShortHistory));
    }

    fn two_containers() -> Recommender {
        let mut r = rec(RightsizingConfig::default());
        feed(&mut r, &key("a"), 2 * 86_400, 300, 0.5, 200 * MIB);
        feed(&mut r, &key("b"), 3600, 60, 1.5, GIB);
        r.observe_oom(&key("b"), t(3601), Some(2 * GIB));
        r.describe(
            &key("a"),
            Some(GIB),
            parse_jvm_options("-XX:MaxRAMPercentage=75").expect("ok"),
        );
        r
    }

    #[test]
    fn checkpoint_round_trip() {
        let r = two_containers();
        let bytes = r.checkpoint(t(2 * 86_400));
        assert!(bytes.starts_with(b"ragent-rightsizing 1 "));
        let back = Recommender::restore(RightsizingConfig::default(), &bytes, t(2 * 86_400))
            .expect("restores");
        assert_eq!(back.recommendations(), r.recommendations());
        for c in ["a", "b"] {
            let (x, y) = (
                back.get(&key(c)).expect("kept"),
                r.get(&key(c)).expect("there"),
            );
            assert_eq!(
                (x.samples(), x.oom_kills(), x.peak_bytes()),
                (y.samples(), y.oom_kills(), y.peak_bytes())
            );
            assert_eq!(x.last_seen(), y.last_seen());
        }
        // Restoring drops what the retention has passed.
        let back = Recommender::restore(RightsizingConfig::default(), &bytes, t(9 * 86_400))
            .expect("restores");
        assert_eq!(back.len(), 1);
        assert!(back.get(&key("a")).is_some());
        // An empty node checkpoints too.
        let empty = rec(RightsizingConfig::default()).checkpoint(t(0));
        let back = Recommender::restore(RightsizingConfig::default(), &empty, t(0)).expect("ok");
        assert!(back.is_empty());
    }

    fn restore(bytes: &[u8]) -> RightsizingError {
        Recommender::restore(RightsizingConfig::default(), bytes, t(0)).expect_err("must fail")
    }

    #[test]
    fn bad_checkpoints_are_typed_errors() {
        let good = two_containers().checkpoint(t(0));
        let nl = good.iter().position(|b| *b == b'\n').expect("header");

        assert!(matches!(restore(b""), RightsizingError::NotACheckpoint));
        assert!(matches!(
            restore(b"{\"containers\":[]}"),
            RightsizingError::NotACheckpoint
        ));
        assert!(matches!(
            restore(b"ragent-rightsizingX 1 00 0\n"),
            RightsizingError::NotACheckpoint
        ));
        // Cut anywhere: in the magic, in the header, in the body.
        for cut in [5, nl - 3, nl + 1, good.len() - 1] {
            let e = restore(&good[..cut]);
            assert!(
                matches!(e, RightsizingError::Truncated { .. }),
                "cut at {cut}: {e}"
            );
            assert_eq!(e.metric_label(), "truncated");
        }
        // Another version.
        let mut v2 = b"ragent-rightsizing 2".to_vec();
        v2.extend_from_slice(&good[b"ragent-rightsizing 1".len()..]);
        let e = restore(&v2);
        assert!(
            matches!(&e, RightsizingError::UnsupportedVersion { found, supported: 1 } if found == "2"),
            "{e}"
        );
        // A flipped bit in the body.
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        assert!(matches!(
            restore(&flipped),
            RightsizingError::ChecksumMismatch { .. }
        ));
        // Bytes after the body.
        let mut longer = good.clone();
        longer.push(b'\n');
        assert!(matches!(restore(&longer), RightsizingError::Corrupt { .. }));
        // A header without length, a length that is no number.
        assert!(matches!(
            restore(b"ragent-rightsizing 1 abc\n{}"),
            RightsizingError::Corrupt { .. }
        ));
        assert!(matches!(
            restore(b"ragent-rightsizing 1 ab x\n{}"),
            RightsizingError::Corrupt { .. }
        ));
        // A correct checksum over a body that is not a checkpoint.
        for body in [
            &b"not json"[..],
            b"{\"containers\":[{\"key\":1}]}",
            b"{\"written_at_ms\":0}",
        ] {
            let mut bytes = format!(
                "ragent-rightsizing 1 {} {}\n",
                hex(&Sha256::digest(body)),
                body.len()
            )
            .into_bytes();
            bytes.extend_from_slice(body);
            let e = restore(&bytes);
            assert!(matches!(e, RightsizingError::CorruptBody { .. }), "{e}");
        }
        // A histogram with an out-of-range bucket, checksummed correctly.
        let text = String::from_utf8(good[nl + 1..].to_vec()).expect("utf-8");
        let body = text.replacen("\"buckets\":[[", "\"buckets\":[[99999,1.0],[", 1);
        let mut bytes = format!(
            "ragent-rightsizing 1 {} {}\n",
            hex(&Sha256::digest(body.as_bytes())),
            body.len()
        )
        .into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        assert!(matches!(
            restore(&bytes),
            RightsizingError::CorruptBody { .. }
        ));
        // Errors read as sentences that say what happens.
        assert!(restore(&flipped).to_string().contains("ignored"));
    }

    #[test]
    fn config_validation() {
        assert!(RightsizingConfig::default().validate().is_ok());
        let bad = [
            RightsizingConfig {
                cpu_target_percentile: 1.5,
                ..Default::default()
            },
            RightsizingConfig {
                cpu_lower_percentile: 0.95,
                ..Default::default()
            },
            RightsizingConfig {
                memory_upper_percentile: 0.5,
                ..Default::default()
            },
            RightsizingConfig {
                safety_margin: -0.1,
                ..Default::default()
            },
            RightsizingConfig {
                max_upper_factor: 0.5,
                ..Default::default()
            },
            RightsizingConfig {
                oom_bump_ratio: 0.9,
                ..Default::default()
            },
            RightsizingConfig {
                memory_window_s: 0,
                ..Default::default()
            },
            RightsizingConfig {
                retention_s: 0,
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(matches!(
                Recommender::new(c),
                Err(RightsizingError::InvalidConfig { .. })
            ));
        }
        // The config reads from TOML, with defaults for what is not given.
        let c: RightsizingConfig =
            toml::from_str("safety_margin = 0.2\nmemory_window_s = 3600").expect("valid toml");
        assert_eq!(c.safety_margin, 0.2);
        assert_eq!(c.memory_window_s, 3600);
        assert_eq!(c.cpu_target_percentile, 0.9);
        assert!(toml::from_str::<RightsizingConfig>("safety_margins = 0.2").is_err());
    }

    #[test]
    fn output_field_names() {
        let r = two_containers();
        let x = r.recommendation(&key("b")).expect("a recommendation");
        let v = serde_json::to_value(&x).expect("json");
        for f in [
            "namespace",
            "pod",
            "container",
            "samples",
            "cpu_target_cores",
            "cpu_lower_cores",
            "cpu_upper_cores",
            "memory_target_bytes",
            "memory_lower_bytes",
            "memory_upper_bytes",
            "memory_peak_bytes",
            "oom_kills",
            "reasons",
        ] {
            assert!(v.get(f).is_some(), "{f} missing in {v}");
        }
        assert_eq!(
            v["reasons"],
            serde_json::json!(["oom_kill", "short_history"])
        );
    }

    // --- instance shapes --------------------------------------------------------------------

    fn demand(cpu: f64, memory_bytes: u64) -> Vec<ContainerRecommendation> {
        let mut r = rec(RightsizingConfig::default());
        feed(&mut r, &key("x"), 60, 60, 0.1, MIB);
        let mut x = r.recommendation(&key("x")).expect("a recommendation");
        // Two containers splitting the demand.
        x.cpu_target_cores = cpu / 2.0;
        x.memory_target_bytes = memory_bytes / 2;
        vec![x.clone(), x]
    }

    #[test]
    fn the_sample_catalog_parses() {
        let c = Catalog::parse(SAMPLE_CATALOG).expect("valid catalog");
        assert_eq!(c.instance_types.len(), 16);
        assert_eq!(c.currency.as_deref(), Some("USD"));
        let g = &c.instance_types[3];
        assert_eq!(
            (g.name.as_str(), g.vcpu, g.memory_bytes),
            ("general-2x8", 2, 8 * GIB)
        );
    }

    #[test]
    fn cheapest_fitting_shape_by_hand() {
        let c = Catalog::parse(SAMPLE_CATALOG).expect("valid catalog");
        let h = Headroom::default();
        let pick = |cpu, mem, cap| advise_shape(&c, &demand(cpu, mem), &h, cap);

        // 1 core, 4 GiB → 1.35 cores, 5.6 GiB: general-2x8 (0.090); the node is a general-4x16
        // (4 cores, 15.6 GiB visible): (0.180 − 0.090) / 0.180 = 50 %.
        let a = pick(1.0, 4 * GIB, Some((4.0, 15 * GIB + 600 * MIB)));
        assert!((a.needed_cpu_cores - 1.35).abs() < 1e-9);
        assert_eq!(
            a.needed_memory_bytes,
            ceil_bytes(4.0 * GIB as f64 * 1.15) + GIB
        );
        assert_eq!(
            a.recommended.as_ref().map(|t| t.name.as_str()),
            Some("general-2x8")
        );
        assert_eq!(
            a.current.as_ref().map(|t| t.name.as_str()),
            Some("general-4x16")
        );
        assert!((a.saving_percent.expect("a saving") - 50.0).abs() < 1e-9);

        // 3 cores, 2 GiB → 3.65 cores, 3.3 GiB: compute-4x8 (0.156) beats general-4x16.
        let b = pick(3.0, 2 * GIB, None);
        assert_eq!(
            b.recommended.as_ref().map(|t| t.name.as_str()),
            Some("compute-4x8")
        );
        assert_eq!(b.current, None);
        assert_eq!(b.saving_percent, None);

        // 0.3 cores, 512 MiB → 0.545 cores, 1.575 GiB: small-1x2 (small-1x1 has 1 GiB).
        let s = pick(0.3, 512 * MIB, None);
        assert_eq!(
            s.recommended.as_ref().map(|t| t.name.as_str()),
            Some("small-1x2")
        );

        // 10 cores, 20 GiB → 11.7 cores, 24 GiB: general-16x64 (0.720) vs compute-16x32 (0.624).
        let l = pick(10.0, 20 * GIB, None);
        assert_eq!(
            l.recommended.as_ref().map(|t| t.name.as_str()),
            Some("compute-16x32")
        );

        // Too big for any shape.
        let none = pick(100.0, GIB, Some((4.0, 16 * GIB)));
        assert_eq!(none.recommended, None);
        assert_eq!(none.saving_percent, None);

        // A node too small for its containers: small-1x2 (1 core, 1.9 GiB) should be
        // general-2x8: (0.022 − 0.090) / 0.022 = −309.09 %.
        let up = pick(1.0, 4 * GIB, Some((1.0, GIB + 900 * MIB)));
        assert_eq!(
            up.current.as_ref().map(|t| t.name.as_str()),
            Some("small-1x2")
        );
        assert!((up.saving_percent.expect("a saving") + 309.0909).abs() < 1e-3);

        // No containers: the system reserve alone (0.2 cores, 1 GiB) fits small-1x1.
        let idle = advise_shape(&c, &[], &h, None);
        assert_eq!(
            idle.recommended.as_ref().map(|t| t.name.as_str()),
            Some("small-1x1")
        );
    }

    #[test]
    fn capacity_matching() {
        let c = Catalog::parse(SAMPLE_CATALOG).expect("valid catalog");
        let name = |cpu, mem| c.match_capacity(cpu, mem).map(|t| t.name.clone());
        assert_eq!(name(8.0, 31 * GIB), Some("general-8x32".into()));
        assert_eq!(name(8.0, 62 * GIB), Some("memory-8x64".into()));
        assert_eq!(name(8.0, 15 * GIB), Some("compute-8x16".into()));
        // 3 cores: no such shape; 8 cores with 24 GiB: between two shapes, matching neither.
        assert_eq!(name(3.0, 12 * GIB), None);
        assert_eq!(name(8.0, 24 * GIB), None);
    }

    #[test]
    fn bad_catalogs_are_refused() {
        let entry = |name: &str, vcpu: &str, mem: &str, price: &str| {
            format!(
                "[[instance_type]]\nname = \"{name}\"\nvcpu = {vcpu}\nmemory_gib = {mem}\nhourly_price = {price}\n"
            )
        };
        let ok = entry("a", "2", "8", "0.1");
        assert!(Catalog::parse(&ok).is_ok());
        assert!(matches!(
            Catalog::parse(""),
            Err(RightsizingError::CatalogEmpty)
        ));
        assert!(matches!(
            Catalog::parse("currency = 1"),
            Err(RightsizingError::CatalogToml { .. })
        ));
        assert!(matches!(
            Catalog::parse(&format!("{ok}colour = \"red\"\n")),
            Err(RightsizingError::CatalogToml { .. })
        ));
        for bad in [
            entry("", "2", "8", "0.1"),
            entry("a", "0", "8", "0.1"),
            entry("a", "2", "0", "0.1"),
            entry("a", "2", "-8", "0.1"),
            entry("a", "2", "8", "-0.1"),
            entry("a", "2", "nan", "0.1"),
            format!("{ok}{ok}"),
        ] {
            assert!(
                matches!(
                    Catalog::parse(&bad),
                    Err(RightsizingError::CatalogEntry { .. })
                ),
                "{bad}"
            );
        }
    }

    // --- properties of the histogram maths ---------------------------------------------------

    /// The weighted percentile straight from the samples: the smallest value at which the
    /// cumulative weight (each weight decayed as `2^((t − t_last) / half_life)`) reaches
    /// `p × total`.
    fn reference_percentile(samples: &[(f64, f64, u64)], half_life_s: f64, p: f64) -> f64 {
        let t_last = samples.iter().map(|s| s.2).max().unwrap_or(0) as f64;
        let mut weighted: Vec<(f64, f64)> = samples
            .iter()
            .map(|(v, w, at)| (*v, w * ((*at as f64 - t_last) / half_life_s).exp2()))
            .collect();
        weighted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total: f64 = weighted.iter().map(|x| x.1).sum();
        let mut cumulative = 0.0;
        for (v, w) in &weighted {
            cumulative += w;
            if cumulative >= p * total {
                return *v;
            }
        }
        weighted.last().map_or(0.0, |x| x.0)
    }

    fn bucket_ending_at(o: &HistogramOptions, end: f64) -> usize {
        (0..o.buckets())
            .find(|i| o.bucket_end(*i) == end)
            .expect("a percentile is a bucket end")
    }

    fn samples_strategy(max_days: u64) -> impl Strategy<Value = Vec<(f64, f64, u64)>> {
        prop::collection::vec((-3.0f64..3.0, 0.1f64..10.0, 0..max_days * 86_400), 1..120).prop_map(
            |v| {
                v.into_iter()
                    .map(|(e, w, s)| (10f64.powf(e), w, s))
                    .collect()
            },
        )
    }

    fn histogram_of(samples: &[(f64, f64, u64)]) -> DecayingHistogram {
        let mut h = DecayingHistogram::new(HistogramOptions::CPU);
        for (v, w, s) in samples {
            h.add(*v, *w, t(*s));
        }
        h
    }

    proptest! {
        /// The histogram's percentile is the end of the bucket of the exact weighted
        /// percentile, give or take one bucket for rounding; samples in any time order, over
        /// up to 200 half-lives (so the reference time moves).
        #[test]
        fn percentile_within_one_bucket_of_the_reference(
            samples in samples_strategy(200),
            p in 0.0f64..=1.0,
        ) {
            let o = HistogramOptions::CPU;
            let h = histogram_of(&samples);
            let got = h.percentile(p).expect("not empty");
            let want = reference_percentile(&samples, o.half_life_s, p);
            let (i, j) = (bucket_ending_at(&o, got), o.bucket_of(want));
            prop_assert!(i.abs_diff(j) <= 1, "p {} got {} (bucket {}) want {} (bucket {})", p, got, i, want, j);
            prop_assert!(h.weights.iter().all(|w| w.is_finite() && *w >= 0.0));
        }

        /// A sample's weight halves per half-life: seen k half-lives later it weighs 2^-k, and
        /// a sample k half-lives younger weighs 2^k times as much.
        #[test]
        fn weights_halve_after_each_half_life(k in 0u32..40, w in 0.01f64..100.0) {
            let hl = HistogramOptions::CPU.half_life_s as u64;
            let mut h = DecayingHistogram::new(HistogramOptions::CPU);
            h.add(0.05, w, t(0));
            let seen = h.total_weight_at(t(u64::from(k) * hl));
            prop_assert!((seen - w * 0.5f64.powi(k as i32)).abs() <= 1e-9 * w);
            h.add(50.0, w, t(u64::from(k) * hl));
            let o = HistogramOptions::CPU;
            let ratio = h.weights[o.bucket_of(50.0)] / h.weights[o.bucket_of(0.05)];
            prop_assert!((ratio / 2f64.powi(k as i32) - 1.0).abs() < 1e-9);
        }

        /// Merging two histograms is adding all their samples to one.
        #[test]
        fn merge_is_adding_all_samples(
            a in samples_strategy(100),
            b in samples_strategy(100),
            p in 0.0f64..=1.0,
        ) {
            let o = HistogramOptions::CPU;
            let mut merged = histogram_of(&a);
            merged.merge(&histogram_of(&b)).expect("same layout");
            let all: Vec<_> = a.iter().chain(&b).copied().collect();
            let single = histogram_of(&all);
            let (x, y) = (merged.percentile(p).expect("x"), single.percentile(p).expect("y"));
            prop_assert!(bucket_ending_at(&o, x).abs_diff(bucket_ending_at(&o, y)) <= 1);
            let want = reference_percentile(&all, o.half_life_s, p);
            prop_assert!(bucket_ending_at(&o, x).abs_diff(o.bucket_of(want)) <= 1);
        }

        /// A histogram survives serialization exactly.
        #[test]
        fn serialization_round_trip(samples in samples_strategy(30)) {
            let h = histogram_of(&samples);
            let json = serde_json::to_string(&h).expect("serializes");
            let back: DecayingHistogram = serde_json::from_str(&json).expect("parses");
            // serde_json may parse a float one ulp off; nothing else may differ.
            prop_assert_eq!(back.options, h.options);
            prop_assert_eq!(back.reference_ms, h.reference_ms);
            for (x, y) in back.weights.iter().zip(&h.weights) {
                prop_assert!((x - y).abs() <= 1e-12 * y.abs());
            }
            prop_assert!((back.total - h.total).abs() <= 1e-12 * h.total);
            for p in [0.0, 0.5, 0.9, 0.95, 1.0] {
                prop_assert_eq!(back.percentile(p), h.percentile(p));
            }
        }

        /// Every value falls in the bucket whose edges hold it.
        #[test]
        fn bucket_edges_hold_their_values(e in -4.0f64..3.5) {
            let o = HistogramOptions::CPU;
            let v = 10f64.powf(e);
            let i = o.bucket_of(v);
            prop_assert!(o.bucket_start(i) <= v);
            prop_assert!(v < o.bucket_end(i) || i == o.buckets() - 1);
        }

        /// Whatever the usage, the recommendation is ordered, above its floors and never below
        /// the observed memory peak.
        #[test]
        fn recommendations_are_ordered_and_above_the_peak(
            usage in prop::collection::vec((0.0f64..8.0, 0u64..(8 * GIB)), 1..60),
            step in 1u64..7200,
            oom in prop::option::of(0u64..(8 * GIB)),
        ) {
            let mut r = rec(RightsizingConfig::default());
            let k = key("p");
            for (i, (cpu, mem)) in usage.iter().enumerate() {
                r.observe(&k, &Sample { at: t(i as u64 * step), cpu_cores: *cpu, memory_bytes: *mem });
            }
            if let Some(m) = oom {
                r.observe_oom(&k, t(usage.len() as u64 * step), Some(m));
            }
            let x = r.recommendation(&k).expect("a recommendation");
            prop_assert!(x.cpu_lower_cores <= x.cpu_target_cores && x.cpu_target_cores <= x.cpu_upper_cores);
            prop_assert!(x.memory_lower_bytes <= x.memory_target_bytes && x.memory_target_bytes <= x.memory_upper_bytes);
            prop_assert!(x.cpu_lower_cores >= 0.01);
            prop_assert!(x.memory_lower_bytes >= 20 * MIB);
            let peak = usage.iter().map(|u| u.1).max().unwrap_or(0);
            prop_assert_eq!(x.memory_peak_bytes, peak);
            prop_assert!(x.memory_target_bytes >= peak);
            if let Some(m) = oom {
                prop_assert!(x.memory_target_bytes >= m + 100 * MIB);
            }
        }
    }
}
