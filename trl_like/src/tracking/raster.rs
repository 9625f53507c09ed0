//! Draws a plot [`Scene`] into pixels and encodes them as PNG, with no
//! system libraries: shapes are rasterized at 3× and averaged down (which
//! anti-aliases lines and dots), text uses the bitmap font in `font.rs`, and
//! the PNG is zlib-compressed with `flate2` (pure Rust).

use std::io::Write;

use super::font;
use super::scene::{Anchor, Rgb, Scene, Shape, TextMetrics, TextRole};

/// Samples per pixel along each axis.
const SS: usize = 3;

/// Font pixel size (in output pixels) for each role: the bitmap font is
/// scaled by whole numbers so its strokes stay sharp.
fn font_scale(role: TextRole) -> usize {
    match role {
        TextRole::Title => 3,
        _ => 2,
    }
}

pub(crate) struct RasterMetrics;

impl TextMetrics for RasterMetrics {
    fn width(&self, text: &str, role: TextRole) -> f64 {
        let n = text.chars().count();
        // The last glyph's spacing column is not ink.
        (n * font::ADVANCE * font_scale(role)).saturating_sub(font_scale(role)) as f64
    }
    fn cap_height(&self, role: TextRole) -> f64 {
        (font::CAP_HEIGHT * font_scale(role)) as f64
    }
}

struct Canvas {
    /// Size in samples (output pixels × SS).
    w: usize,
    h: usize,
    px: Vec<Rgb>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        let (w, h) = (width * SS, height * SS);
        Canvas {
            w,
            h,
            px: vec![Rgb(255, 255, 255); w * h],
        }
    }

    /// Fills the samples whose centres fall in the scene-unit rectangle.
    fn fill_rect(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb) {
        let s = SS as f64;
        let (sx0, sx1) = (
            ((x0 * s) - 0.5).ceil().max(0.0) as usize,
            (((x1 * s) - 0.5).floor() + 1.0).max(0.0) as usize,
        );
        let (sy0, sy1) = (
            ((y0 * s) - 0.5).ceil().max(0.0) as usize,
            (((y1 * s) - 0.5).floor() + 1.0).max(0.0) as usize,
        );
        for y in sy0..sy1.min(self.h) {
            for x in sx0..sx1.min(self.w) {
                self.px[y * self.w + x] = c;
            }
        }
    }

    /// A segment of the given width with round ends (a capsule).
    fn segment(&mut self, (ax, ay): (f64, f64), (bx, by): (f64, f64), width: f64, c: Rgb) {
        let s = SS as f64;
        let (ax, ay, bx, by, r) = (ax * s, ay * s, bx * s, by * s, width * s / 2.0);
        let (dx, dy) = (bx - ax, by - ay);
        let len2 = dx * dx + dy * dy;
        let x_range = self.clamp_range(ax.min(bx) - r, ax.max(bx) + r, self.w);
        let y_range = self.clamp_range(ay.min(by) - r, ay.max(by) + r, self.h);
        for y in y_range.clone() {
            let py = y as f64 + 0.5;
            for x in x_range.clone() {
                let px = x as f64 + 0.5;
                let t = if len2 > 0.0 {
                    (((px - ax) * dx + (py - ay) * dy) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let (ex, ey) = (px - (ax + t * dx), py - (ay + t * dy));
                if ex * ex + ey * ey <= r * r {
                    self.px[y * self.w + x] = c;
                }
            }
        }
    }

    fn disc(&mut self, cx: f64, cy: f64, r: f64, c: Rgb) {
        self.segment((cx, cy), (cx, cy), 2.0 * r, c);
    }

    fn clamp_range(&self, lo: f64, hi: f64, n: usize) -> std::ops::Range<usize> {
        let lo = lo.floor().max(0.0) as usize;
        let hi = (hi.ceil() + 1.0).max(0.0) as usize;
        lo.min(n)..hi.min(n)
    }

    fn text(
        &mut self,
        (x, y): (f64, f64),
        text: &str,
        role: TextRole,
        c: Rgb,
        anchor: Anchor,
        vertical: bool,
    ) {
        let scale = font_scale(role);
        let width = RasterMetrics.width(text, role);
        let shift = match anchor {
            Anchor::Start => 0.0,
            Anchor::Middle => (width / 2.0).round(),
            Anchor::End => width,
        };
        // Whole output pixels keep glyphs crisp.
        let (x, y) = (x.round(), y.round());
        let cell = scale as f64;
        for (i, ch) in text.chars().enumerate() {
            let glyph = font::glyph(ch);
            let pen = (i * font::ADVANCE * scale) as f64 - shift;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) == 0 {
                        continue;
                    }
                    // Offsets along the text and down from the baseline (row 7 is below it).
                    let along = pen + (col * scale) as f64;
                    let down = (row as f64 - font::CAP_HEIGHT as f64) * cell;
                    let (px, py) = if vertical {
                        // Rotated 90° counter-clockwise: "along" points up, "down" points right.
                        (x + down, y - along - cell)
                    } else {
                        (x + along, y + down)
                    };
                    self.fill_rect(px, py, px + cell, py + cell, c);
                }
            }
        }
    }

    /// Averages each SS×SS block into one output pixel.
    fn downsample(&self) -> Vec<u8> {
        let (w, h) = (self.w / SS, self.h / SS);
        let mut out = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let mut acc = [0u32; 3];
                for sy in 0..SS {
                    for sx in 0..SS {
                        let p = self.px[(y * SS + sy) * self.w + x * SS + sx];
                        acc[0] += u32::from(p.0);
                        acc[1] += u32::from(p.1);
                        acc[2] += u32::from(p.2);
                    }
                }
                let n = (SS * SS) as u32;
                out.extend(acc.iter().map(|a| ((a + n / 2) / n) as u8));
            }
        }
        out
    }
}

fn rasterize(scene: &Scene) -> (usize, usize, Vec<u8>) {
    let (width, height) = (scene.width.round() as usize, scene.height.round() as usize);
    let mut canvas = Canvas::new(width, height);
    for shape in &scene.shapes {
        match shape {
            Shape::Rect {
                x,
                y,
                w,
                h,
                fill,
                stroke,
            } => {
                if let Some(c) = fill {
                    canvas.fill_rect(*x, *y, x + w, y + h, *c);
                }
                if let Some(c) = stroke {
                    let (x0, y0, x1, y1) = (*x, *y, x + w, y + h);
                    for (a, b) in [
                        ((x0, y0), (x1, y0)),
                        ((x1, y0), (x1, y1)),
                        ((x1, y1), (x0, y1)),
                        ((x0, y1), (x0, y0)),
                    ] {
                        canvas.segment(a, b, 1.0, *c);
                    }
                }
            }
            Shape::Line {
                x1,
                y1,
                x2,
                y2,
                color,
                width,
            } => canvas.segment((*x1, *y1), (*x2, *y2), *width, *color),
            Shape::Polyline {
                points,
                color,
                width,
            } => {
                for ab in points.windows(2) {
                    canvas.segment(ab[0], ab[1], *width, *color);
                }
            }
            Shape::Marker { x, y, r, color } => {
                canvas.disc(*x, *y, r + 1.0, Rgb(255, 255, 255));
                canvas.disc(*x, *y, *r, *color);
            }
            Shape::Text {
                x,
                y,
                text,
                role,
                color,
                anchor,
                vertical,
            } => canvas.text((*x, *y), text, *role, *color, *anchor, *vertical),
        }
    }
    (width, height, canvas.downsample())
}

/// Renders the scene as an 8-bit RGB PNG.
pub(crate) fn render_png(scene: &Scene) -> Vec<u8> {
    let (w, h, rgb) = rasterize(scene);
    encode_png(w, h, &rgb)
}

fn encode_png(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
    // Each scanline starts with its filter type; "Up" (2) turns the long
    // vertical runs of a chart into zeros, which deflate well.
    let stride = w * 3;
    let mut raw = Vec::with_capacity((stride + 1) * h);
    for y in 0..h {
        raw.push(2);
        let row = &rgb[y * stride..(y + 1) * stride];
        if y == 0 {
            raw.extend_from_slice(row);
        } else {
            let prev = &rgb[(y - 1) * stride..y * stride];
            raw.extend(row.iter().zip(prev).map(|(a, b)| a.wrapping_sub(*b)));
        }
    }
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&raw).expect("writing to a Vec cannot fail");
    let idat = z.finish().expect("writing to a Vec cannot fail");

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, truecolour, deflate, standard filters, no interlace

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"tEXt", b"Software\0trl_like");
    chunk(&mut png, b"IDAT", &idat);
    chunk(&mut png, b"IEND", &[]);
    png
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&out[start..]).to_be_bytes());
}

/// CRC-32 (ISO-HDLC, the zlib/PNG one), from the crc32fast that flate2 links.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        // The IEND chunk's well-known CRC.
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
    }
}
