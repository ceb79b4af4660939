use proptest::prelude::*;

use super::*;

const ST: &[u8] = include_bytes!("../../testdata/tiny.safetensors");
const ST_SPANS: &str = include_str!("../../testdata/tiny.safetensors.json");
const GG: &[u8] = include_bytes!("../../testdata/tiny.gguf");
const GG_SPANS: &str = include_str!("../../testdata/tiny.gguf.json");

/// (start, length) of every tensor as the library that wrote the file says.
fn spans(json: &str) -> Vec<(u64, u64)> {
    serde_json::from_str(json).unwrap()
}

fn layout(bytes: &[u8]) -> Layout {
    match parse(bytes, bytes.len() as u64) {
        Parsed::Layout(l) => l,
        other => panic!("no layout: {other:?}"),
    }
}

/// Parses as prefetch does: a growing prefix until the parser has enough.
fn parse_growing(bytes: &[u8], first: usize) -> Parsed {
    let mut have = first.min(bytes.len());
    for _ in 0..64 {
        match parse(&bytes[..have], bytes.len() as u64) {
            Parsed::More(n) => {
                assert!(
                    n as usize > have && n <= MAX_HEADER + 8,
                    "More({n}) with {have} bytes"
                );
                have = (n as usize).min(bytes.len());
            }
            done => return done,
        }
    }
    panic!("the parser asked for more bytes 64 times");
}

fn invariants(l: &Layout, size: u64) {
    let t = l.tensors();
    assert!(!t.is_empty());
    assert!(t.iter().all(|r| r.start < r.end && r.end <= size));
    assert!(t.windows(2).all(|w| w[0].end <= w[1].start));
}

#[test]
fn safetensors_from_the_python_library() {
    let want: Vec<_> = spans(ST_SPANS)
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .map(|(s, n)| s..s + n)
        .collect();
    assert_eq!(layout(ST).tensors(), want);
}

#[test]
fn safetensors_header_past_the_prefix_asks_for_exactly_the_header() {
    let n = u64::from_le_bytes(ST[..8].try_into().unwrap());
    assert_eq!(parse(&ST[..5], ST.len() as u64), Parsed::More(8));
    assert_eq!(parse(&ST[..100], ST.len() as u64), Parsed::More(8 + n));
    assert_eq!(parse_growing(ST, 3), Parsed::Layout(layout(ST)));
}

#[test]
fn gguf_from_the_gguf_package() {
    let l = layout(GG);
    let want = spans(GG_SPANS);
    assert_eq!(l.tensors().len(), want.len());
    for (t, &(start, len)) in l.tensors().iter().zip(&want) {
        assert_eq!(t.start, start);
        assert!(t.end >= start + len, "{t:?} is shorter than {len}");
    }
    assert_eq!(l.tensors().last().unwrap().end, GG.len() as u64);
    assert_eq!(parse_growing(GG, 10), Parsed::Layout(l));
}

#[test]
fn tensor_at_finds_the_tensor_or_none_in_headers_and_gaps() {
    let l = Layout::new(vec![10..20, 30..40], 50).unwrap();
    assert_eq!(l.tensor_at(0), None);
    assert_eq!(l.tensor_at(10), Some(10..20));
    assert_eq!(l.tensor_at(19), Some(10..20));
    assert_eq!(l.tensor_at(20), None);
    assert_eq!(l.tensor_at(39), Some(30..40));
    assert_eq!(l.tensor_at(40), None);
}

fn st_file(header: &str, data: usize) -> Vec<u8> {
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header.as_bytes());
    f.resize(f.len() + data, 7);
    f
}

#[test]
fn lying_safetensors_headers_are_no_layout() {
    let ok = st_file(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#,
        4,
    );
    assert!(matches!(parse(&ok, ok.len() as u64), Parsed::Layout(_)));
    for (header, data) in [
        // beyond the end of the file
        (
            r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,5]}}"#,
            4,
        ),
        // overlapping
        (
            r#"{"a":{"data_offsets":[0,4]},"b":{"data_offsets":[2,6]}}"#,
            6,
        ),
        // backwards, and overflowing
        (r#"{"a":{"data_offsets":[4,0]}}"#, 4),
        (r#"{"a":{"data_offsets":[0,18446744073709551615]}}"#, 4),
        // not a tensor, not an object, not JSON, no tensors
        (r#"{"a":{"dtype":"U8"}}"#, 4),
        (r#"[1,2]"#, 4),
        (r#"{"a":"#, 4),
        (r#"{"__metadata__":{"a":"b"}}"#, 4),
    ] {
        let f = st_file(header, data);
        assert_eq!(parse(&f, f.len() as u64), Parsed::Unknown, "{header}");
    }
    // A header length past the cap or the file is refused before any is read.
    let mut huge = (MAX_HEADER + 1).to_le_bytes().to_vec();
    huge.push(b'{');
    assert_eq!(parse(&huge, u64::MAX), Parsed::Unknown);
    assert_eq!(parse(&ok[..8], 20), Parsed::Unknown);
}

fn gguf_head(version: u32, tensors: u64, kvs: u64) -> Vec<u8> {
    let mut f = b"GGUF".to_vec();
    f.extend_from_slice(&version.to_le_bytes());
    f.extend_from_slice(&tensors.to_le_bytes());
    f.extend_from_slice(&kvs.to_le_bytes());
    f
}

#[test]
fn hostile_gguf_headers_are_no_layout() {
    let big = 1 << 40;
    assert_eq!(parse(&gguf_head(1, 1, 0), big), Parsed::Unknown);
    assert_eq!(parse(&gguf_head(3, u64::MAX, 0), big), Parsed::Unknown);
    assert_eq!(parse(&gguf_head(3, 0, u64::MAX), big), Parsed::Unknown);
    // An array claiming more elements than the file could hold.
    let mut f = gguf_head(3, 0, 1);
    f.extend_from_slice(&1u64.to_le_bytes());
    f.push(b'k');
    f.extend_from_slice(&9u32.to_le_bytes());
    f.extend_from_slice(&8u32.to_le_bytes());
    f.extend_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(parse(&f, f.len() as u64), Parsed::Unknown);
    assert!(matches!(parse(&f, big), Parsed::More(_)));
    // An unknown value type.
    let mut f = gguf_head(3, 0, 1);
    f.extend_from_slice(&1u64.to_le_bytes());
    f.push(b'k');
    f.extend_from_slice(&99u32.to_le_bytes());
    assert_eq!(parse(&f, big), Parsed::Unknown);
}

#[test]
fn gguf_tensors_at_the_same_offset_or_beyond_the_file_are_no_layout() {
    // The fixture's tensor offsets are the last 8 bytes of each tensor info:
    // point the second tensor at the first's offset, then past the file.
    let l = layout(GG);
    let data = l.tensors()[0].start;
    let second = spans(GG_SPANS)[1].0 - data;
    let at = GG
        .windows(8)
        .position(|w| w == second.to_le_bytes())
        .unwrap();
    let mut f = GG.to_vec();
    f[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
    assert_eq!(parse(&f, f.len() as u64), Parsed::Unknown);
    f[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert_eq!(parse(&f, f.len() as u64), Parsed::Unknown);
}

fn check_any(bytes: &[u8], size: u64) {
    match parse(bytes, size) {
        Parsed::Layout(l) => invariants(&l, size),
        Parsed::More(n) => assert!(n > bytes.len() as u64 && n <= size.min(MAX_HEADER + 8)),
        Parsed::Unknown => {}
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), extra in 0u64..1 << 20) {
        check_any(&bytes, bytes.len() as u64 + extra);
        let mut st = bytes.clone();
        st.splice(0..0, ((bytes.len() as u64) / 2).to_le_bytes());
        check_any(&st, st.len() as u64 + extra);
        let mut gg = b"GGUF\x03\0\0\0".to_vec();
        gg.extend_from_slice(&bytes);
        check_any(&gg, gg.len() as u64 + extra);
    }

    #[test]
    fn corrupted_fixtures_never_panic(at in 0usize..4096, with in any::<u8>(), cut in 0usize..9000) {
        for fixture in [ST, GG] {
            let mut f = fixture.to_vec();
            let at = at % f.len();
            f[at] = with;
            check_any(&f, f.len() as u64);
            let cut = cut.min(f.len());
            check_any(&f[..cut], f.len() as u64);
        }
    }
}
