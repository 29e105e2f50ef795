//! `streamworker bench` end to end, small: every entry size gets its table with Redis's
//! busy share, and the scale-out drain starts its private three-primary cluster and
//! drains a partitioned group's partitions spread over it, through partition ownership.

use crate::support::run_cli;

/// The cells of the table row that starts with `| {name} |`, in the section after `heading`.
fn row(report: &str, heading: &str, name: &str) -> Vec<String> {
    let section = report
        .split_once(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in:\n{report}"))
        .1;
    let line = section
        .lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no row {name:?} after {heading:?} in:\n{report}"));
    line.trim_matches('|')
        .split(" | ")
        .map(|c| c.trim().to_owned())
        .collect()
}

fn number(cell: &str) -> f64 {
    cell.trim_end_matches(['%', '×', ' '])
        .parse()
        .unwrap_or_else(|_| panic!("not a number: {cell:?}"))
}

#[test]
fn bench_reports_every_entry_size_and_the_partitioned_drain() {
    let (code, out, err) = run_cli(
        &[
            "bench",
            "--entries",
            "60000",
            "--runs",
            "1",
            "--replicas",
            "1",
            "--no-python",
            "--duration",
            "1s",
            "--rate",
            "1000",
            "--entry-size",
            "100,1024",
            "--partitions",
            "1,4,16",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    for heading in ["100-byte entries, 60000 of them", "1024-byte entries"] {
        let sw = row(&out, heading, "streamworker");
        // entries/s, Redis CPU µs/entry and Redis busy were measured.
        assert!(number(&sw[1]) > 0.0, "{out}");
        assert!(number(&sw[3]) > 0.0, "{out}");
        let busy = number(&sw[5]);
        assert!(busy > 0.0 && busy <= 100.0, "busy share {busy}:\n{out}");
        assert!(number(&row(&out, heading, "hand-written redis-rs loop")[1]) > 0.0);
    }
    // The partitioned drains run one group with `partitions = P`, as users do: when each
    // drain is done, the daemon holds the lease of every partition (one group per
    // partition stream, as the bench once configured, takes no lease).
    assert!(
        out.contains("one group `bench` on stream `bench` (with `partitions = P`"),
        "{out}"
    );
    for (name, leased) in [
        ("1 partition, cluster", "1 / 1"),
        ("4 partitions, cluster", "4 / 4"),
        ("16 partitions, cluster", "16 / 16"),
        ("16 partitions, cluster, even slots", "16 / 16"),
    ] {
        assert_eq!(row(&out, "Scale-out", name)[2], leased, "{out}");
    }
    let one = row(&out, "Scale-out", "one stream, one server");
    assert_eq!(one[1], "1");
    assert_eq!(one[2], "—", "one stream has no partitions to lease:\n{out}");
    assert!(number(&one[4]) > 0.0, "{out}");
    let single = row(&out, "Scale-out", "1 partition, cluster");
    // One partition lives on one of the three primaries; the others do nothing.
    let spread: Vec<u32> = single[1].split(" / ").map(|c| c.parse().unwrap()).collect();
    assert_eq!(spread.len(), 3);
    assert_eq!(spread.iter().sum::<u32>(), 1);
    let four = row(&out, "Scale-out", "4 partitions, cluster");
    let spread: Vec<u32> = four[1].split(" / ").map(|c| c.parse().unwrap()).collect();
    assert_eq!(spread.iter().sum::<u32>(), 4, "{out}");
    assert!(
        number(&four[3]) >= 0.0,
        "ms to take every partition:\n{out}"
    );
    assert!(number(&four[4]) > 0.0, "{out}");
    assert!(
        number(&four[6]) > 0.0,
        "entries/s once all partitions ran:\n{out}"
    );
    assert!(number(&four[8]) > 0.0, "Redis CPU per entry:\n{out}");
    // Every primary holding a partition was busy draining it (its CPU time is counted in
    // 10 ms clock ticks, so each drains enough entries to take a few).
    let busy: Vec<f64> = four[9].split(" / ").map(number).collect();
    assert_eq!(busy.len(), 3);
    for (held, busy) in spread.iter().zip(&busy) {
        if *held > 0 {
            assert!(*busy > 0.0, "{out}");
        }
    }
    // 4 partitions over 3 primaries are as even as they can be; 16 are not (7 / 3 / 6), so
    // 16 are drained again on a cluster whose slots hold 6 / 5 / 5.
    assert!(!out.contains("4 partitions, cluster, even slots"), "{out}");
    assert_eq!(
        row(&out, "Scale-out", "16 partitions, cluster")[1],
        "7 / 3 / 6"
    );
    let even = row(&out, "Scale-out", "16 partitions, cluster, even slots");
    assert_eq!(even[1], "6 / 5 / 5", "{out}");
    assert!(number(&even[4]) > 0.0, "{out}");
}
