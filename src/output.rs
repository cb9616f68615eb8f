//! How the CLI prints the log for people (tables) and for tools (JSON lines).

use amplog_log::audit::{BreakKind, VerifyReport};
use amplog_log::{AppendedEvent, RecordedEvent};

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(16)]
}

pub fn appended(label: &str, events: &[AppendedEvent]) {
    for e in events {
        println!(
            "  {:>5}  {:<12} {}  #{:<3} {:<22} v{}  {}",
            e.position,
            e.aggregate_type,
            &e.aggregate_id[e.aggregate_id.len().saturating_sub(8)..],
            e.sequence,
            e.event_type,
            e.event_version,
            short(&e.hash)
        );
    }
    if events.is_empty() {
        println!("  (nothing appended) {label}");
    }
}

pub fn history(events: &[RecordedEvent], json: bool) {
    if !json {
        println!(
            "{:>8}  {:>4}  {:<30}  {:<12}  {:<36}  {:<22}  {:<16}  hash",
            "position", "seq", "recorded_at", "stream", "aggregate_id", "event", "actor"
        );
    }
    for e in events {
        let actor = e.metadata.get("actor").and_then(|a| a.as_str()).unwrap_or("-");
        let hash = e.hash.as_deref().map(hex::encode).unwrap_or_default();
        if json {
            let line = serde_json::json!({
                "position": e.position,
                "transaction_id": e.transaction_id.to_string(),
                "aggregate_type": e.aggregate_type,
                "aggregate_id": e.aggregate_id,
                "sequence": e.sequence,
                "event_type": e.event_type,
                "event_version": e.event_version,
                "recorded_at": e.recorded_at,
                "actor": actor,
                "event_id": e.event_id,
                "hash": hash,
                "payload": e.payload,
            });
            println!("{line}");
        } else {
            println!(
                "{:>8}  {:>4}  {:<30}  {:<12}  {:<36}  {:<22}  {:<16}  {}",
                e.position,
                e.sequence,
                e.recorded_at.to_rfc3339(),
                e.aggregate_type,
                e.aggregate_id,
                format!("{} v{}", e.event_type, e.event_version),
                actor,
                short(&hash)
            );
        }
    }
}

pub fn verify(report: &VerifyReport) {
    for b in &report.breaks {
        let what = match &b.kind {
            BreakKind::HashMismatch { stored, computed } => {
                format!("hash mismatch (stored {}, computed {})", short(stored), short(computed))
            }
            BreakKind::BrokenLink => "previous hash does not match the previous event".to_string(),
            BreakKind::SequenceGap { expected } => format!("sequence gap (expected {expected})"),
            BreakKind::Unhashed => "event has no hash".to_string(),
        };
        println!("BROKEN  {}/{} #{}: {what}", b.aggregate_type, b.aggregate_id, b.sequence);
    }
    for (t, id, sequence, hash) in report.heads.iter().take(50) {
        println!("head    {t}/{id} #{sequence} {}", short(hash));
    }
    if report.heads.len() > 50 {
        println!("head    ... and {} more streams", report.heads.len() - 50);
    }
    println!(
        "{}: {} events in {} streams, {} break(s)",
        if report.is_intact() { "intact" } else { "BROKEN" },
        report.events,
        report.streams,
        report.breaks.len()
    );
}

/// A progress bar on stderr for a job of `total` steps (hidden when stderr is not a
/// terminal; the job's summary line is printed either way).
pub fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, {eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}
