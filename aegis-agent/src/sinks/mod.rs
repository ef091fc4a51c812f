//! Where call records go: standard output and/or an append-only JSON lines file.

use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
};

use anyhow::Context as _;
use serde::Serialize;

/// One JSON object per line. The caller flushes after each burst of records, so a record
/// reaches the file within one pass of the output loop.
pub struct JsonLines {
    stdout: Option<BufWriter<std::io::Stdout>>,
    file: Option<BufWriter<File>>,
    pub written: u64,
    pub write_errors: u64,
}

impl JsonLines {
    /// `file`: empty path for none. The file is created with mode 0600 (records name
    /// processes and models; they are not for every local user).
    pub fn open(stdout: bool, file: &Path) -> anyhow::Result<Self> {
        let file = if file.as_os_str().is_empty() {
            None
        } else {
            if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create the directory of output.file {}", dir.display()))?;
            }
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(file)
                .with_context(|| format!("cannot open output.file {}", file.display()))?;
            Some(BufWriter::new(f))
        };
        let stdout = stdout.then(|| BufWriter::new(std::io::stdout()));
        Ok(Self { stdout, file, written: 0, write_errors: 0 })
    }

    pub fn write<T: Serialize>(&mut self, record: &T) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(e) => {
                self.write_errors += 1;
                tracing::error!(error = %e, "cannot serialise a record");
                return;
            }
        };
        line.push(b'\n');
        if let Some(out) = &mut self.stdout
            && out.write_all(&line).is_err()
        {
            self.write_errors += 1;
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(&line)
        {
            self.write_errors += 1;
            tracing::error!(error = %e, "cannot write to output.file");
        }
        self.written += 1;
    }

    pub fn flush(&mut self) {
        if let Some(out) = &mut self.stdout
            && out.flush().is_err()
        {
            self.write_errors += 1;
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.flush()
        {
            self.write_errors += 1;
            tracing::error!(error = %e, "cannot write to output.file");
        }
    }
}
