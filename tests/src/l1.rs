//! What test programs running inside the nested bed's L1 print: one `LUVMM-L1` line per
//! result, which the bed's driver collects from the serial console.

use std::io::Write;

/// Prints `LUVMM-L1 <text>` at once.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "LUVMM-L1 {text}");
    let _ = out.flush();
}

/// The value after `flag` in a test program's arguments (`--flag VALUE`).
pub fn flag<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

/// Counts results and prints each as `test <prefix><name> ok` or `... FAIL why`.
pub struct Report {
    prefix: &'static str,
    pub pass: u32,
    pub fail: u32,
}

impl Report {
    pub fn new(prefix: &'static str) -> Report {
        Report {
            prefix,
            pass: 0,
            fail: 0,
        }
    }

    pub fn check(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.pass += 1;
                line(&format!("test {}{name} ok", self.prefix));
            }
            Err(why) => {
                self.fail += 1;
                line(&format!("test {}{name} FAIL {why}", self.prefix));
            }
        }
    }

    /// Prints `stage N done pass=P fail=F`; the exit code: 1 if anything failed.
    pub fn done(&self, stage: u32) -> i32 {
        line(&format!(
            "stage {stage} done pass={} fail={}",
            self.pass, self.fail
        ));
        i32::from(self.fail > 0)
    }
}
