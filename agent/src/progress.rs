//! The progress display of `ragent prepull` on a terminal: per image and in total, the bytes
//! fetched of the bytes missing, the rate and the time left. Pullers feed it; a ticker draws it.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::images::human_bytes;

#[derive(Debug, Default)]
struct State {
    images: Vec<Line>,
    /// digest -> (size, bytes received)
    blobs: HashMap<String, (u64, u64)>,
    first_byte: Option<Instant>,
}

#[derive(Debug)]
struct Line {
    name: String,
    blobs: Vec<String>,
    done: bool,
}

/// Shared between the fetchers (which add bytes) and the ticker (which draws).
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<State>,
}

/// One image's line, or the total.
#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub got: u64,
    pub total: u64,
    pub done: bool,
}

impl Progress {
    /// Sets what will be fetched: for each image, the missing blobs (digest, size).
    pub fn plan(&self, images: &[(String, Vec<(String, u64)>)]) {
        let mut s = self.lock();
        for (name, blobs) in images {
            for (d, size) in blobs {
                s.blobs.entry(d.clone()).or_insert((*size, 0));
            }
            s.images.push(Line {
                name: name.clone(),
                blobs: blobs.iter().map(|(d, _)| d.clone()).collect(),
                done: false,
            });
        }
    }

    pub fn advance(&self, digest: &str, n: u64) {
        let mut s = self.lock();
        s.first_byte.get_or_insert_with(Instant::now);
        if let Some((size, got)) = s.blobs.get_mut(digest) {
            *got = (*got + n).min(*size);
        }
    }

    /// A blob is complete (also when it needed no bytes: resumed, or fetched by someone else).
    pub fn blob_done(&self, digest: &str) {
        if let Some((size, got)) = self.lock().blobs.get_mut(digest) {
            *got = *size;
        }
    }

    pub fn image_done(&self, name: &str) {
        for l in self.lock().images.iter_mut().filter(|l| l.name == name) {
            l.done = true;
        }
    }

    /// Per image then the total.
    pub fn figures(&self) -> (Vec<(String, Figures)>, Figures) {
        let s = self.lock();
        let lines = s
            .images
            .iter()
            .map(|l| {
                let (got, total) = l.blobs.iter().fold((0, 0), |(g, t), d| {
                    let (size, got) = s.blobs.get(d).copied().unwrap_or((0, 0));
                    (g + got, t + size)
                });
                (
                    l.name.clone(),
                    Figures {
                        got,
                        total,
                        done: l.done,
                    },
                )
            })
            .collect();
        let (got, total) = s
            .blobs
            .values()
            .fold((0, 0), |(g, t), (size, got)| (g + got, t + size));
        let done = !s.images.is_empty() && s.images.iter().all(|l| l.done);
        (lines, Figures { got, total, done })
    }

    /// The lines to draw, `elapsed` after the first byte arrived.
    pub fn frame(&self) -> Vec<String> {
        let elapsed = self.lock().first_byte.map(|t| t.elapsed());
        let (images, total) = self.figures();
        render(&images, &total, elapsed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// Draws the figures: one line per image, then the total with rate and ETA.
pub fn render(
    images: &[(String, Figures)],
    total: &Figures,
    elapsed: Option<Duration>,
) -> Vec<String> {
    let mut out: Vec<String> = images
        .iter()
        .map(|(name, f)| {
            let state = if f.done {
                "ready"
            } else if f.total > 0 && f.got >= f.total {
                "unpacking"
            } else {
                "fetching"
            };
            format!(
                "{name}  {} / {}  {state}",
                human_bytes(f.got),
                human_bytes(f.total)
            )
        })
        .collect();
    let secs = elapsed.map_or(0.0, |e| e.as_secs_f64());
    let rate = if secs > 0.0 {
        total.got as f64 / secs
    } else {
        0.0
    };
    let eta = if total.got >= total.total {
        "0s".to_string()
    } else if rate > 0.0 {
        format!("{:.0}s", ((total.total - total.got) as f64 / rate).ceil())
    } else {
        "?".to_string()
    };
    out.push(format!(
        "total  {} / {}  {}/s  ETA {eta}",
        human_bytes(total.got),
        human_bytes(total.total),
        human_bytes(rate as u64)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_blobs_count_once_in_total_and_for_each_image() {
        let p = Progress::default();
        p.plan(&[
            (
                "a".into(),
                vec![("sha256:run".into(), 1000), ("sha256:app-a".into(), 100)],
            ),
            ("b".into(), vec![("sha256:run".into(), 1000)]),
        ]);
        p.advance("sha256:run", 400);
        p.advance("sha256:app-a", 1000); // a registry sending too much never shows > 100 %
        let (images, total) = p.figures();
        assert_eq!(images[0].1.got, 500);
        assert_eq!(images[0].1.total, 1100);
        assert_eq!(images[1].1.got, 400);
        assert_eq!(total.got, 500);
        assert_eq!(total.total, 1100);
        p.blob_done("sha256:run");
        p.image_done("b");
        let (images, total) = p.figures();
        assert!(images[1].1.done);
        assert_eq!(total.got, 1100);
        assert!(!total.done);
    }

    #[test]
    fn the_frame_shows_rate_and_eta() {
        let images = vec![(
            "reg/app:v1".to_string(),
            Figures {
                got: 1 << 20,
                total: 4 << 20,
                done: false,
            },
        )];
        let total = Figures {
            got: 1 << 20,
            total: 4 << 20,
            done: false,
        };
        let lines = render(&images, &total, Some(Duration::from_secs(2)));
        assert_eq!(lines[0], "reg/app:v1  1.0 MiB / 4.0 MiB  fetching");
        // 1 MiB in 2 s: 512 KiB/s, 3 MiB left: 6 s.
        assert_eq!(lines[1], "total  1.0 MiB / 4.0 MiB  512.0 KiB/s  ETA 6s");
        let lines = render(&images, &total, None);
        assert!(lines[1].ends_with("ETA ?"), "{}", lines[1]);
    }
}
