//! `--stream-log FILE`: every stream record processed, appended as one JSON line in DynamoDB's
//! stream record format (as Lambda receives it), for `roomcast replay` and for reading.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use aws_lambda_events::dynamodb::EventRecord;

#[derive(Debug)]
pub struct StreamLog {
    file: Mutex<std::fs::File>,
    path: String,
}

impl StreamLog {
    pub fn open(path: &Path) -> std::io::Result<StreamLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(StreamLog { file: Mutex::new(file), path: path.display().to_string() })
    }

    pub fn append(&self, records: &[EventRecord]) {
        let mut lines = Vec::new();
        for record in records {
            if serde_json::to_writer(&mut lines, record).is_ok() {
                lines.push(b'\n');
            }
        }
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(&lines).and_then(|()| file.flush()) {
            tracing::error!(path = %self.path, error = %e, "cannot append to the stream log");
        }
    }
}
