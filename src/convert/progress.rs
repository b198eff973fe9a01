//! Progress bars, one per layer, on stderr when it is a terminal
//! (`indicatif`); with progress off every call is a no-op.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The set of bars of one conversion.
#[derive(Clone)]
pub(crate) struct Progress {
    multi: Option<MultiProgress>,
}

/// One layer's bar.
#[derive(Clone)]
pub(crate) struct LayerBar {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        Self {
            multi: enabled.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
        }
    }

    /// A bar for `label`, counting the `size` bytes of its download.
    pub fn layer(&self, label: &str, size: u64) -> LayerBar {
        let bar = self.multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(size));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>12} [{bar:30}] {bytes:>10}/{total_bytes:<10} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_owned());
            b.set_message("waiting");
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        LayerBar { bar }
    }

    /// A line above the bars (or nothing when off).
    pub fn println(&self, msg: &str) {
        if let Some(m) = &self.multi {
            let _ = m.println(msg);
        }
    }
}

impl LayerBar {
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub fn stage(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.to_owned());
        }
    }

    pub fn done(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_position(b.length().unwrap_or(0));
            b.finish_with_message(msg.to_owned());
        }
    }
}
