//! TensorBoard event files: every metric of a run as a scalar (`[metrics] tensorboard = true`),
//! in `<run>/tensorboard/events.out.tfevents.<time>.<host>.<pid>`, which TensorBoard (and
//! `tensorboard.backend.event_processing`) reads.
//!
//! The format is TFRecord: each record is its length (u64, little-endian), the masked CRC-32C of
//! those 8 bytes, the record (a protobuf `tensorflow.Event`), and its masked CRC-32C. The first
//! event names the file version; each later one holds a step's scalars.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

/// `tensorflow.Event` (the fields rtrain writes).
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// The CRC TFRecord stores: CRC-32C, rotated and offset so data holding its own CRC stays safe.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// Appends events to one file of a run's `tensorboard/` folder.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// A new event file in `dir` (created), opened with its version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = crate::launch::status::host_name();
        let name = format!("events.out.tfevents.{}.{}.{}", now.as_secs(), host, std::process::id());
        let path = dir.join(name);
        let file = File::options().create(true).append(true).open(&path)?;
        let mut writer = Self { path, file };
        let version =
            Event { wall_time: now.as_secs_f64(), step: 0, file_version: Some("brain.Event:2".into()), summary: None };
        writer.write(&version)?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the scalars of one step, tagged by name; non-finite values are left out.
    pub fn scalars(
        &mut self,
        step: u64,
        wall_time: f64,
        values: impl IntoIterator<Item = (String, f64)>,
    ) -> std::io::Result<()> {
        let value: Vec<SummaryValue> = values
            .into_iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(tag, v)| SummaryValue { tag, simple_value: Some(v as f32) })
            .collect();
        if value.is_empty() {
            return Ok(());
        }
        let event = Event { wall_time, step: step as i64, file_version: None, summary: Some(Summary { value }) };
        self.write(&event)
    }

    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc(&data).to_le_bytes());
        // One write per record, flushed: a crash leaves whole records behind.
        self.file.write_all(&record)?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // TensorFlow's crc32c_test: Mask(Value("foo")) and the CRC-32C of 32 zero bytes.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        let unmasked = crc32c::crc32c(b"foo");
        assert_eq!(masked_crc(b"foo"), unmasked.rotate_right(15).wrapping_add(0xa282_ead8));
        assert_ne!(masked_crc(b"foo"), unmasked);
    }

    #[test]
    fn records_are_framed_with_their_lengths_and_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(3, 1.5, [("train/loss".to_string(), 2.5), ("nan".to_string(), f64::NAN)]).unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let s = events[1].summary.as_ref().unwrap();
        assert_eq!((events[1].step, s.value.len()), (3, 1), "the NaN is left out");
        assert_eq!((s.value[0].tag.as_str(), s.value[0].simple_value), ("train/loss", Some(2.5)));
    }
}
