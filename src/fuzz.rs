//! Bounded fuzzing with proptest, for unit tests: [`run`] feeds a strategy's inputs to a check
//! and prints how many it tried. A panic or a failed check is a crash: proptest shrinks it to a
//! small input, which the failure prints, to be kept as a regression test.
//!
//! `TWINSITE_FUZZ_CASES` sets the cases per target (default 2000, seconds in CI);
//! `TWINSITE_FUZZ_SEED` a 64-digit hex seed, or `random` for a new one each run (printed). The
//! default seed is fixed, so CI runs the same inputs every time.

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

const DEFAULT_CASES: u32 = 2000;
const DEFAULT_SEED: [u8; 32] = *b"twinsite fuzz: fixed seed for CI";

fn cases() -> u32 {
    std::env::var("TWINSITE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn seed() -> [u8; 32] {
    match std::env::var("TWINSITE_FUZZ_SEED").as_deref() {
        Ok("random") => {
            let mut s = [0u8; 32];
            getrandom::fill(&mut s).expect("no randomness for a fuzz seed");
            s
        }
        Ok(hex_seed) => hex::decode(hex_seed)
            .ok()
            .and_then(|v| v.try_into().ok())
            .expect("TWINSITE_FUZZ_SEED: 64 hex digits or random"),
        Err(_) => DEFAULT_SEED,
    }
}

/// Runs `check` on inputs of `strategy`; panics with the shrunk input on a crash. Returns the
/// number of inputs tried.
pub fn run<S: Strategy>(
    target: &str,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64
where
    S::Value: std::fmt::Debug,
{
    let seed = seed();
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let tried = AtomicU64::new(0);
    let result = runner.run(&strategy, |v| {
        tried.fetch_add(1, Ordering::Relaxed);
        check(v)
    });
    let n = tried.load(Ordering::Relaxed);
    if let Err(e) = result {
        panic!(
            "fuzz {target}: inputs: {n}, crashes: 1 (seed {}): {e}",
            hex::encode(seed)
        );
    }
    println!("fuzz {target}: inputs: {n}, crashes: 0");
    n
}
