//! Byte corpora: raw bytes read from a file, or a seeded synthetic English-like text with
//! structure a small model can learn (a fixed grammar, per-seed facts and correct arithmetic).

use std::path::Path;

use super::DataError;
use super::splitmix::SplitMix64;

/// The fewest bytes a corpus can have: one input byte and its next-byte target.
pub const MIN_CORPUS_LEN: usize = 2;

/// A training corpus held in memory as bytes (the model's vocabulary is the 256 byte values).
#[derive(Debug, Clone)]
pub struct ByteCorpus {
    bytes: Vec<u8>,
    /// Where the bytes came from, for error messages (a path or `synthetic(seed=..)`).
    source: String,
}

impl ByteCorpus {
    /// Exactly `len` bytes of generated text; the same `seed` gives the same bytes. Generates
    /// tens of MB per second.
    pub fn synthetic(seed: u64, len: usize) -> Self {
        let mut text = SyntheticText::new(seed, len);
        while text.out.len() < len {
            text.paragraph();
        }
        let mut bytes = text.out;
        bytes.truncate(len);
        Self { bytes, source: format!("synthetic(seed={seed})") }
    }

    /// The raw bytes of the file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Read { path: path.to_path_buf(), source })?;
        let corpus = Self { bytes, source: path.display().to_string() };
        corpus.check_len(MIN_CORPUS_LEN)?;
        Ok(corpus)
    }

    /// Splits off the last `fraction` of the bytes (at least one): `(the rest, the tail)`, for a
    /// held-out split.
    pub fn split_tail(mut self, fraction: f64) -> (Self, Self) {
        let keep = self.bytes.len() - ((self.bytes.len() as f64 * fraction).ceil() as usize).clamp(1, self.bytes.len());
        let tail = self.bytes.split_off(keep);
        let source = format!("the last {:.0}% of {}", fraction * 100.0, self.source);
        (
            Self { bytes: self.bytes, source: format!("{} (held-out tail excluded)", self.source) },
            Self { bytes: tail, source },
        )
    }

    /// Errors unless the corpus holds at least `needed` bytes, naming its source.
    pub fn check_len(&self, needed: usize) -> Result<(), DataError> {
        if self.bytes.len() < needed {
            return Err(DataError::TooShort { source_name: self.source.clone(), len: self.bytes.len(), needed });
        }
        Ok(())
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when the corpus has no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The corpus bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where the bytes came from: a file path or `synthetic(seed=..)`.
    pub fn source(&self) -> &str {
        &self.source
    }
}

const SUBJECTS: &[&str] = &[
    "the cat",
    "the dog",
    "a bird",
    "my friend",
    "the teacher",
    "a child",
    "the old man",
    "the robot",
    "her sister",
    "the farmer",
    "a small fox",
    "the captain",
];
const VERBS: &[&str] =
    &["sees", "likes", "finds", "carries", "watches", "follows", "paints", "remembers", "builds", "opens"];
const OBJECTS: &[&str] = &[
    "the ball",
    "an apple",
    "the river",
    "a book",
    "the red door",
    "the moon",
    "a letter",
    "the garden",
    "a wooden box",
    "the map",
    "the bridge",
    "a song",
];
const ADVERBIALS: &[&str] =
    &["today", "every morning", "at night", "in the rain", "near the house", "with great care", "again"];
const THINGS: &[&str] =
    &["sky", "grass", "sea", "sun", "snow", "stone", "leaf", "cloud", "sand", "rose", "coal", "lake"];
const COLOURS: &[&str] = &["blue", "green", "grey", "yellow", "white", "black", "red", "brown"];

/// The generator state: the output buffer, the stream and the per-seed facts.
struct SyntheticText {
    out: Vec<u8>,
    rng: SplitMix64,
    /// `colour_of[i]` is the one colour `THINGS[i]` has in this seed's world.
    colour_of: Vec<&'static str>,
}

impl SyntheticText {
    fn new(seed: u64, len: usize) -> Self {
        let mut rng = SplitMix64::new(seed);
        let colour_of = THINGS.iter().map(|_| *rng.pick(COLOURS)).collect();
        // A paragraph can overshoot `len`; the caller truncates.
        Self { out: Vec::with_capacity(len + 256), rng, colour_of }
    }

    /// Four to eight sentences separated by spaces, ending in a newline.
    fn paragraph(&mut self) {
        let n = 4 + self.rng.below(5);
        for i in 0..n {
            if i > 0 {
                self.out.push(b' ');
            }
            self.sentence();
        }
        self.out.push(b'\n');
    }

    fn sentence(&mut self) {
        match self.rng.below(10) {
            0..=3 => self.action(),
            4..=5 => self.fact(),
            6..=7 => self.sum(),
            8 => self.difference(),
            _ => self.product(),
        }
    }

    /// "The dog follows a letter at night."
    fn action(&mut self) {
        let subject = *self.rng.pick(SUBJECTS);
        self.capitalised(subject);
        let verb = *self.rng.pick(VERBS);
        let object = *self.rng.pick(OBJECTS);
        self.push(" ");
        self.push(verb);
        self.push(" ");
        self.push(object);
        if self.rng.below(2) == 0 {
            let adverbial = *self.rng.pick(ADVERBIALS);
            self.push(" ");
            self.push(adverbial);
        }
        self.push(".");
    }

    /// "The snow is white." with the same colour for a thing throughout the corpus.
    fn fact(&mut self) {
        let i = self.rng.below(THINGS.len());
        self.push("The ");
        self.push(THINGS[i]);
        self.push(" is ");
        self.push(self.colour_of[i]);
        self.push(".");
    }

    /// "17 + 25 = 42."
    fn sum(&mut self) {
        let (a, b) = (self.rng.below(100), self.rng.below(100));
        self.equation(a, " + ", b, a + b);
    }

    /// "64 - 19 = 45." (never negative)
    fn difference(&mut self) {
        let (a, b) = (self.rng.below(100), self.rng.below(100));
        let (a, b) = (a.max(b), a.min(b));
        self.equation(a, " - ", b, a - b);
    }

    /// "7 * 8 = 56."
    fn product(&mut self) {
        let (a, b) = (self.rng.below(13), self.rng.below(13));
        self.equation(a, " * ", b, a * b);
    }

    fn equation(&mut self, a: usize, op: &str, b: usize, result: usize) {
        self.number(a);
        self.push(op);
        self.number(b);
        self.push(" = ");
        self.number(result);
        self.push(".");
    }

    fn push(&mut self, s: &str) {
        self.out.extend_from_slice(s.as_bytes());
    }

    fn capitalised(&mut self, s: &str) {
        let start = self.out.len();
        self.push(s);
        if let Some(first) = self.out.get_mut(start) {
            first.make_ascii_uppercase();
        }
    }

    /// Decimal digits without going through `fmt`.
    fn number(&mut self, mut n: usize) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.out.extend_from_slice(&digits[i..]);
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_exact_length() {
        let a = ByteCorpus::synthetic(3, 10_000);
        let b = ByteCorpus::synthetic(3, 10_000);
        let c = ByteCorpus::synthetic(4, 10_000);
        assert_eq!(a.len(), 10_000);
        assert_eq!(a.bytes(), b.bytes());
        assert_ne!(a.bytes(), c.bytes());
        assert_eq!(ByteCorpus::synthetic(3, 0).len(), 0);
    }

    #[test]
    fn synthetic_text_is_ascii_sentences_with_correct_sums() {
        let corpus = ByteCorpus::synthetic(11, 200_000);
        let text = std::str::from_utf8(corpus.bytes()).expect("ascii");
        assert!(text.is_ascii());
        let mut sums = 0;
        for sentence in text.split(['.', '\n']).map(str::trim) {
            let parts: Vec<&str> = sentence.split(' ').collect();
            if let [a, "+", b, "=", c] = parts.as_slice() {
                let (a, b, c): (usize, usize, usize) =
                    (a.parse().expect("a"), b.parse().expect("b"), c.parse().expect("c"));
                assert_eq!(a + b, c, "{sentence}");
                sums += 1;
            }
        }
        assert!(sums > 1000, "only {sums} sums");
    }

    #[test]
    fn facts_are_consistent_within_a_seed() {
        let corpus = ByteCorpus::synthetic(5, 100_000);
        let text = std::str::from_utf8(corpus.bytes()).expect("ascii");
        let mut seen = std::collections::HashMap::new();
        for sentence in text.split(". ").flat_map(|s| s.split(".\n")) {
            if let Some(rest) = sentence.strip_prefix("The ")
                && let Some((thing, colour)) = rest.split_once(" is ")
            {
                let prev = seen.entry(thing.to_string()).or_insert_with(|| colour.to_string());
                assert_eq!(prev, colour, "{thing}");
            }
        }
        assert!(seen.len() >= 10);
    }

    #[test]
    fn from_file_reads_bytes_and_names_short_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.txt");
        std::fs::write(&path, b"hello").expect("write");
        let corpus = ByteCorpus::from_file(&path).expect("read");
        assert_eq!(corpus.bytes(), b"hello");
        std::fs::write(&path, b"h").expect("write");
        let err = ByteCorpus::from_file(&path).expect_err("too short");
        assert!(err.to_string().contains("c.txt"), "{err}");
        let err = ByteCorpus::from_file(&dir.path().join("missing")).expect_err("missing");
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
