package dev.edgemm.demo;

/**
 * Host (desktop JDK) twin of app/src/main/java/dev/edgemm/demo/EdgemmNative.kt: the same class name and
 * the same native methods, so the very JNI symbols of app/src/main/cpp/edgemm_jni.cpp bind to it.
 * tests/test_android_bridge.py checks that the Kotlin, Java and C++ declarations match.
 */
public final class EdgemmNative {
    static {
        System.loadLibrary("edgemm"); // the engine, as on Android
        System.loadLibrary("edgemm_jni");
    }

    private EdgemmNative() {}

    public static final int STAT_IMAGE_ENCODE_MS = 0;
    public static final int STAT_PREFILL_MS = 1;
    public static final int STAT_DECODE_MS = 2;
    public static final int STAT_TTFT_MS = 3;
    public static final int STAT_VISUAL_TOKENS = 4;
    public static final int STAT_PREFILL_TOKENS = 5;
    public static final int STAT_DECODE_TOKENS = 6;
    public static final int STAT_NPU_LANE_BUSY = 7;
    public static final int STAT_CPU_LANE_BUSY = 8;
    public static final int STAT_CANCELLED = 9;

    public static native int abiVersion();

    public static native String version();

    public static native long loadModel(String path, int nThreads, boolean npuLane, int chunkSize, int maxContext);

    public static native void freeModel(long model);

    public static native String modelInfo(long model);

    public static native long createSession(long model);

    public static native void freeSession(long session);

    public static native void setImageArgb(long session, int[] argb, int width, int height);

    public static native void clearImage(long session);

    public static native double[] generate(long session, String prompt, int maxNewTokens, float temperature, int topK,
                                           float topP, long seed, TokenListener listener);
}
