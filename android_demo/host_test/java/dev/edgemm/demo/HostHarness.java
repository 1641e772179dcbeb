package dev.edgemm.demo;

import java.awt.image.BufferedImage;
import java.io.File;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import javax.imageio.ImageIO;

/**
 * Runs the Android app's native calls on the host JDK, in the app's order (Engine.kt / MainViewModel.kt):
 * loadModel -> modelInfo -> createSession -> setImageArgb (pixels as Bitmap.getPixels gives them:
 * 0xAARRGGBB, here from BufferedImage.getRGB) -> generate with a streaming listener, per question ->
 * clearImage -> generate (text only) -> freeSession -> freeModel; then the bridge's error paths.
 *
 * Usage: java -Djava.library.path=DIRS dev.edgemm.demo.HostHarness BUNDLE IMAGE.png MAX_NEW_TOKENS Q1 [Q2 ...]
 * Prints one JSON object per line (parsed by tests/test_android_bridge.py); exit status 0 unless the run
 * itself failed (an uncaught exception exits 1 with its stack trace on stderr).
 */
public final class HostHarness {
    private HostHarness() {}

    public static void main(String[] args) throws Exception {
        if (args.length < 4) {
            System.err.println("usage: HostHarness BUNDLE IMAGE.png MAX_NEW_TOKENS QUESTION...");
            System.exit(2);
        }
        String bundle = args[0];
        BufferedImage img = ImageIO.read(new File(args[1]));
        if (img == null) throw new IllegalArgumentException("not an image: " + args[1]);
        int maxNew = Integer.parseInt(args[2]);

        System.out.println(obj("event", str("version"), "abi", Integer.toString(EdgemmNative.abiVersion()),
                "version", str(EdgemmNative.version())));

        long model = EdgemmNative.loadModel(bundle, 2, true, 0, 0); // the app's default: NPU lane on
        String info = EdgemmNative.modelInfo(model);
        System.out.println(obj("event", str("info"), "info", info));
        long session = EdgemmNative.createSession(model);

        int w = img.getWidth(), h = img.getHeight();
        int[] argb = img.getRGB(0, 0, w, h, null, 0, w);
        EdgemmNative.setImageArgb(session, argb, w, h);

        for (int i = 3; i < args.length; i++) {
            answer(session, args[i], maxNew, "answer", -1);
        }

        // Stop after the first token: the listener returns false -> cancelled, not an error.
        answer(session, args[3], maxNew, "cancel", 1);

        // A listener that throws: the exception reaches the caller of generate.
        try {
            EdgemmNative.generate(session, args[3], maxNew, 0f, 0, 1f, 0L, (piece, id) -> {
                throw new IllegalStateException("listener failed on purpose");
            });
            System.out.println(obj("event", str("listener_throws"), "caught", str("")));
        } catch (IllegalStateException e) {
            System.out.println(obj("event", str("listener_throws"), "caught", str(e.getMessage())));
        }

        // Sampling with a seed is repeatable.
        String s1 = collect(session, args[3], maxNew, 1.0f, 20, 0.95f, 1234L);
        String s2 = collect(session, args[3], maxNew, 1.0f, 20, 0.95f, 1234L);
        System.out.println(obj("event", str("sampling"), "first", str(s1), "second", str(s2)));

        // Non-ASCII text crosses the bridge (UTF-16 <-> UTF-8, outside the BMP too).
        answer(session, "what color is the \u25b2 triangle \uD83D\uDD3A?", maxNew, "unicode", -1);

        EdgemmNative.clearImage(session);
        answer(session, args[3], maxNew, "text_only", -1);

        // Error paths: each must be a Java exception, never a crash.
        errorCase("short_pixels", () -> EdgemmNative.setImageArgb(session, new int[3], w, h));
        errorCase("zero_size", () -> EdgemmNative.setImageArgb(session, argb, 0, h));
        errorCase("null_handle", () -> EdgemmNative.createSession(0L));
        errorCase("null_prompt", () -> EdgemmNative.generate(session, null, 4, 0f, 0, 1f, 0L, (p, t) -> true));
        errorCase("empty_prompt", () -> EdgemmNative.generate(session, "", 4, 0f, 0, 1f, 0L, (p, t) -> true));
        errorCase("bad_top_p", () -> EdgemmNative.generate(session, args[3], 4, 0f, 0, 0f, 0L, (p, t) -> true));
        errorCase("missing_model", () -> EdgemmNative.loadModel(bundle + "/does-not-exist", 1, false, 0, 0));

        EdgemmNative.freeSession(session);
        EdgemmNative.freeModel(model);
        System.out.println(obj("event", str("done")));
    }

    interface Call {
        void run() throws Exception;
    }

    static void errorCase(String name, Call c) {
        try {
            c.run();
            System.out.println(obj("event", str("error_case"), "name", str(name), "thrown", "null"));
        } catch (Exception e) {
            String status = e instanceof EdgemmException ? Integer.toString(((EdgemmException) e).getStatus()) : "null";
            System.out.println(obj("event", str("error_case"), "name", str(name), "thrown",
                    str(e.getClass().getName()), "status", status, "message", str(String.valueOf(e.getMessage()))));
        }
    }

    static String collect(long session, String q, int maxNew, float temp, int topK, float topP, long seed) {
        StringBuilder sb = new StringBuilder();
        EdgemmNative.generate(session, q, maxNew, temp, topK, topP, seed, (piece, id) -> {
            sb.append(piece);
            return true;
        });
        return sb.toString();
    }

    static void answer(long session, String q, int maxNew, String event, int stopAfter) {
        List<String> pieces = new ArrayList<>();
        List<Integer> ids = new ArrayList<>();
        double[] st = EdgemmNative.generate(session, q, maxNew, 0f, 0, 1f, 0L, (piece, id) -> {
            pieces.add(piece);
            ids.add(id);
            return stopAfter < 0 || pieces.size() < stopAfter;
        });
        StringBuilder arr = new StringBuilder("[");
        for (int i = 0; i < pieces.size(); i++) arr.append(i > 0 ? "," : "").append(str(pieces.get(i)));
        arr.append("]");
        String answer = String.join("", pieces).trim();
        System.out.println(obj("event", str(event), "question", str(q), "answer", str(answer), "pieces", arr.toString(),
                "ids", ids.toString(), "stats", stats(st)));
    }

    static String stats(double[] v) {
        String[] names = {"image_encode_ms", "prefill_ms", "decode_ms", "ttft_ms", "visual_tokens", "prefill_tokens",
                "decode_tokens", "npu_lane_busy", "cpu_lane_busy", "cancelled"};
        StringBuilder sb = new StringBuilder("{");
        for (int i = 0; i < names.length; i++) {
            sb.append(i > 0 ? "," : "").append(str(names[i])).append(':').append(String.format(Locale.ROOT, "%.6f", v[i]));
        }
        return sb.append('}').toString();
    }

    /** A JSON object from alternating keys and already-encoded JSON values. */
    static String obj(String... kv) {
        StringBuilder sb = new StringBuilder("{");
        for (int i = 0; i < kv.length; i += 2) {
            sb.append(i > 0 ? "," : "").append(str(kv[i])).append(':').append(kv[i + 1]);
        }
        return sb.append('}').toString();
    }

    static String str(String s) {
        StringBuilder sb = new StringBuilder("\"");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            if (c == '"' || c == '\\') sb.append('\\').append(c);
            else if (c < 0x20 || c > 0x7e) sb.append(String.format(Locale.ROOT, "\\u%04x", (int) c));
            else sb.append(c);
        }
        return sb.append('"').toString();
    }
}
