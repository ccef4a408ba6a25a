//! `medledger bench fhir` with tiny counts, so that the benchmark keeps working as the API
//! it measures changes. Nothing here looks at how fast anything was.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_fhir_runs_every_phase_over_http_and_ends_with_its_figures_as_json() {
    // Goal: with 20 requests, 2 clients and 30 records for `$everything`, the benchmark
    // starts its three nodes, logs its clinicians in at the token endpoints, runs every
    // timed phase over HTTP without one failed request, finds all 30 records in the
    // `$everything` answer, exits 0, and its last line of output is one JSON object
    // carrying every figure the benchmark promises. Timings are not checked.
    let output = Command::new(env!("CARGO_BIN_EXE_medledger"))
        .args([
            "bench",
            "fhir",
            "--requests",
            "20",
            "--fhir-clients",
            "2",
            "--everything-resources",
            "30",
            "--everything-runs",
            "2",
        ])
        .output()
        .expect("the medledger binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let shown = format!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "bench fhir failed:\n{shown}");
    let last = stdout.lines().last().unwrap_or("");
    let figures: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last line is not JSON ({e}):\n{shown}"));
    assert_eq!(figures["bench"], "fhir", "{shown}");
    for key in [
        "read_per_s",
        "read_ms_p50",
        "read_ms_p99",
        "read_remote_per_s",
        "read_remote_ms_p50",
        "read_remote_ms_p99",
        "create_per_s",
        "create_ms_p50",
        "create_ms_p99",
        "everything_ms_p50",
        "everything_ms_p99",
        "metadata_per_s",
        "token_check_per_s",
        "ledger_commit_per_s",
        "peak_memory_mib",
    ] {
        assert!(figures[key].is_number(), "{key} missing:\n{shown}");
    }
    assert_eq!(figures["everything_resources"], 30, "{shown}");
    assert_eq!(figures["failures"], 0, "{shown}");
    assert!(figures["goals"]["reads"].is_boolean(), "{shown}");
}
