//! The picture a plot is laid out as: a list of shapes in output coordinates
//! (y down), with the text metrics each backend reports. `plot` lays a chart
//! out as a [`Scene`]; the SVG writer and `raster` draw it. A leaf module, so
//! neither backend depends on the chart code.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Rgb(pub u8, pub u8, pub u8);

#[derive(Clone, Copy, Debug)]
pub(crate) enum Anchor {
    Start,
    Middle,
    End,
}

/// What a piece of text is for; each backend maps it to a size.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TextRole {
    Title,
    Subtitle,
    AxisLabel,
    Tick,
    Legend,
    Note,
}

#[derive(Debug)]
pub(crate) enum Shape {
    Rect {
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: Option<Rgb>,
        stroke: Option<Rgb>,
    },
    Line {
        x1: f64,
        y1: f64,
        x2: f64,
        y2: f64,
        color: Rgb,
        width: f64,
    },
    Polyline {
        points: Vec<(f64, f64)>,
        color: Rgb,
        width: f64,
    },
    /// A filled dot with a white rim.
    Marker { x: f64, y: f64, r: f64, color: Rgb },
    /// `(x, y)` is on the baseline; `vertical` text reads bottom to top.
    Text {
        x: f64,
        y: f64,
        text: String,
        role: TextRole,
        color: Rgb,
        anchor: Anchor,
        vertical: bool,
    },
}

pub(crate) struct Scene {
    pub width: f64,
    pub height: f64,
    pub shapes: Vec<Shape>,
}

/// Text extents as a backend will draw them, so the layout leaves room.
pub(crate) trait TextMetrics {
    fn width(&self, text: &str, role: TextRole) -> f64;
    fn cap_height(&self, role: TextRole) -> f64;
}
