use super::*;

fn rec(time_ms: u64, stream: Stream, text: &str) -> Record {
    Record {
        time_ms,
        stream,
        partial: false,
        text: text.as_bytes().to_vec(),
    }
}

fn texts(rs: &[Record]) -> Vec<String> {
    rs.iter()
        .map(|r| String::from_utf8_lossy(&r.text).into_owned())
        .collect()
}

#[test]
fn splitter_cuts_lines_and_holds_the_unfinished_one() {
    let mut s = LineSplitter::new(Stream::Err, 16);
    let mut out = Vec::new();
    s.push(b"one\ntw", 5, &mut out);
    assert_eq!(texts(&out), ["one"]);
    assert_eq!(s.pending(), 2);
    s.push(b"o\n\nthree", 6, &mut out);
    assert_eq!(texts(&out), ["one", "two", "",]);
    assert!(out.iter().all(|r| r.stream == Stream::Err && !r.partial));
    assert_eq!(out[1].time_ms, 6);
    s.flush(7, &mut out);
    assert_eq!(texts(&out)[3], "three");
    assert_eq!(s.pending(), 0);
    s.flush(8, &mut out);
    assert_eq!(out.len(), 4, "nothing held: flush adds nothing");
}

#[test]
fn long_lines_are_split_and_marked() {
    let mut s = LineSplitter::new(Stream::Out, 10);
    let mut out = Vec::new();
    let long = "a".repeat(25);
    s.push(long.as_bytes(), 1, &mut out);
    // Two full pieces out at once; the rest waits for the newline.
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|r| r.partial && r.text.len() == 10));
    s.push(b"\n", 2, &mut out);
    assert_eq!(out.len(), 3);
    assert!(!out[2].partial);
    assert_eq!(out[2].text.len(), 5);
    let joined: Vec<u8> = out.iter().flat_map(|r| r.text.clone()).collect();
    assert_eq!(joined, long.as_bytes());
}

#[test]
fn a_split_never_cuts_a_utf8_character() {
    let mut s = LineSplitter::new(Stream::Out, 10);
    let mut out = Vec::new();
    // 9 ASCII bytes then a 3-byte character: a cut at 10 would split it.
    let line = format!("{}€€€\n", "x".repeat(9));
    s.push(line.as_bytes(), 1, &mut out);
    for r in &out {
        assert!(std::str::from_utf8(&r.text).is_ok(), "{:?}", r.text);
        assert!(r.text.len() <= 10);
    }
    let joined: String = texts(&out).concat();
    assert_eq!(joined, line.trim_end());
    // Binary output is cut at the cap, whatever it holds.
    let mut out = Vec::new();
    s.push(&[0x80; 25], 1, &mut out);
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|r| r.text.len() == 10));
}

#[test]
fn records_round_trip_with_stream_time_and_partial_flag() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LogWriter::open(dir.path(), MIN_MAX_BYTES).unwrap();
    let mut p = rec(3, Stream::Err, "piece");
    p.partial = true;
    let input = vec![
        rec(1, Stream::Out, "hello world"),
        rec(2, Stream::Err, "oops: \u{fffd} and spaces  "),
        p,
        Record::note(4, "12 lines dropped\nhere"),
        Record {
            time_ms: 5,
            stream: Stream::Out,
            partial: false,
            text: vec![0xff, 0x00, b'x'],
        },
    ];
    w.append(&input).unwrap();
    let back = read(dir.path(), 0, 100).unwrap();
    assert_eq!(back.len(), 5);
    assert_eq!(back[0], input[0]);
    assert_eq!(back[1], input[1]);
    assert_eq!(back[2], input[2]);
    // A newline in a note is never stored: the format holds one a line.
    assert_eq!(back[3].text, b"12 lines dropped here");
    assert_eq!(back[3].stream, Stream::Agent);
    assert_eq!(back[4], input[4]);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &fs::metadata(dir.path().join(CURRENT))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn since_and_max_lines_pick_the_last_lines_at_or_after_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LogWriter::open(dir.path(), MIN_MAX_BYTES).unwrap();
    let recs: Vec<Record> = (0..50)
        .map(|i| rec(1000 + i, Stream::Out, &format!("line {i}")))
        .collect();
    w.append(&recs).unwrap();
    let all = read(dir.path(), 0, 1000).unwrap();
    assert_eq!(all.len(), 50);
    let tail = read(dir.path(), 0, 3).unwrap();
    assert_eq!(texts(&tail), ["line 47", "line 48", "line 49"]);
    let since = read(dir.path(), 1045, 1000).unwrap();
    assert_eq!(
        texts(&since),
        ["line 45", "line 46", "line 47", "line 48", "line 49"]
    );
    let both = read(dir.path(), 1010, 2).unwrap();
    assert_eq!(texts(&both), ["line 48", "line 49"]);
    assert!(read(dir.path(), 2000, 10).unwrap().is_empty());
    assert!(read(dir.path(), 0, 0).unwrap().is_empty());
    // No log yet: no lines, no error.
    let empty = tempfile::tempdir().unwrap();
    assert!(read(&empty.path().join("none"), 0, 10).unwrap().is_empty());
}

#[test]
fn rotation_keeps_two_files_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = MIN_MAX_BYTES;
    let mut w = LogWriter::open(dir.path(), budget).unwrap();
    let line = "z".repeat(1000);
    let mut n = 0u64;
    // Written one record at a time and in batches: ten budgets' worth.
    while n < 1300 {
        let batch: Vec<Record> = (0..(n % 7 + 1))
            .map(|i| rec(n + i, Stream::Out, &format!("{:06} {line}", n + i)))
            .collect();
        n += batch.len() as u64;
        w.append(&batch).unwrap();
        let cur = fs::metadata(dir.path().join(CURRENT)).unwrap().len();
        let prev = fs::metadata(dir.path().join(PREVIOUS)).map_or(0, |m| m.len());
        assert!(cur <= budget / 2, "current {cur}");
        assert!(prev <= budget / 2, "previous {prev}");
    }
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // What is kept is the newest lines, in order, without a gap.
    let kept = read(dir.path(), 0, MAX_READ_LINES).unwrap();
    assert!(kept.len() > 60, "{}", kept.len());
    let first = kept[0].time_ms;
    for (i, r) in kept.iter().enumerate() {
        assert_eq!(r.time_ms, first + i as u64);
    }
    assert_eq!(kept.last().unwrap().time_ms, n - 1);
}

#[test]
fn a_torn_record_is_skipped_and_does_not_spoil_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LogWriter::open(dir.path(), MIN_MAX_BYTES).unwrap();
    w.append(&[rec(1, Stream::Out, "before")]).unwrap();
    drop(w);
    // The agent died in the middle of a record.
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.path().join(CURRENT))
        .unwrap();
    f.write_all(b"2 o half a rec").unwrap();
    // A reader meanwhile sees only whole records.
    assert_eq!(texts(&read(dir.path(), 0, 10).unwrap()), ["before"]);
    let mut w = LogWriter::open(dir.path(), MIN_MAX_BYTES).unwrap();
    w.append(&[rec(3, Stream::Err, "after")]).unwrap();
    let back = read(dir.path(), 0, 10).unwrap();
    // The torn one parses as a record of its own (its bytes are valid)
    // but the next record starts on its own line, intact.
    assert_eq!(back.last().unwrap(), &rec(3, Stream::Err, "after"));
    assert_eq!(back.first().unwrap(), &rec(1, Stream::Out, "before"));
    // Garbage lines are skipped.
    fs::write(
        dir.path().join(PREVIOUS),
        b"junk\n12x o no\n9 q bad flag\n7 o ok\n",
    )
    .unwrap();
    let back = read(dir.path(), 0, 10).unwrap();
    assert_eq!(back[0], rec(7, Stream::Out, "ok"));
}

#[test]
fn bad_budgets_and_symlinks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for b in [0, MIN_MAX_BYTES - 1, MAX_MAX_BYTES + 1] {
        let e = LogWriter::open(dir.path(), b).unwrap_err();
        assert!(e.to_string().contains("engine log budget"), "{e}");
    }
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join(CURRENT)).unwrap();
    let e = LogWriter::open(dir.path(), MIN_MAX_BYTES).unwrap_err();
    assert!(e.to_string().contains(CURRENT), "{e}");
    assert!(read(dir.path(), 0, 10).is_err());
    // A symlink for the directory itself: refused too, nothing written
    // where it points.
    let elsewhere = tempfile::tempdir().unwrap();
    let link = dir.path().join("logs");
    std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
    let e = LogWriter::open(&link, MIN_MAX_BYTES).unwrap_err();
    assert!(e.to_string().contains("symlink"), "{e}");
    assert!(read(&link, 0, 10).is_err());
    assert_eq!(fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}

/// A read keeps at most `MAX_READ_BYTES` of text, the newest lines,
/// whatever the files hold (it no longer reads a whole file into memory);
/// a line too long to be a record is skipped, not kept.
#[test]
fn a_read_keeps_the_newest_lines_within_its_byte_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("logs");
    let mut w = LogWriter::open(&dir, 64 << 20).unwrap();
    let line = "x".repeat(LINE_MAX);
    let n = MAX_READ_BYTES / LINE_MAX + 100;
    let records: Vec<Record> = (0..n).map(|i| rec(i as u64, Stream::Out, &line)).collect();
    w.append(&records).unwrap();
    let back = read(&dir, 0, MAX_READ_LINES).unwrap();
    let bytes: usize = back.iter().map(|r| r.text.len()).sum();
    assert!(bytes <= MAX_READ_BYTES, "{bytes}");
    assert_eq!(back.len(), MAX_READ_BYTES / LINE_MAX);
    assert_eq!(back.last().unwrap().time_ms, (n - 1) as u64, "the newest");
    // A line longer than any record, between two records: skipped.
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.join(CURRENT))
        .unwrap();
    let mut junk = b"99 o ".to_vec();
    junk.extend(std::iter::repeat_n(b'y', 3 * LINE_MAX));
    junk.push(b'\n');
    f.write_all(&junk).unwrap();
    drop(f);
    w.append(&[rec(1 << 40, Stream::Err, "after")]).unwrap();
    let back = read(&dir, 1 << 40, 10).unwrap();
    assert_eq!(texts(&back), ["after"]);
    let all = read(&dir, 0, MAX_READ_LINES).unwrap();
    assert!(all.iter().all(|r| r.text.len() <= LINE_MAX));
}

/// A rotation between the two opens makes both names the same file (the
/// current one renamed): it is read once. Simulated by a hard link.
#[test]
fn the_same_file_under_both_names_is_read_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("logs");
    let mut w = LogWriter::open(&dir, MIN_MAX_BYTES).unwrap();
    w.append(&[rec(1, Stream::Out, "one"), rec(2, Stream::Out, "two")])
        .unwrap();
    fs::hard_link(dir.join(CURRENT), dir.join(PREVIOUS)).unwrap();
    assert_eq!(texts(&read(&dir, 0, 10).unwrap()), ["one", "two"]);
}
