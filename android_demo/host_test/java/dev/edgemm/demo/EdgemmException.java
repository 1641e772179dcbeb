package dev.edgemm.demo;

/** Host twin of the Kotlin EdgemmException (EdgemmNative.kt): the JNI bridge constructs it by (int, String). */
public class EdgemmException extends Exception {
    private static final long serialVersionUID = 1L;
    private final int status;

    public EdgemmException(int status, String message) {
        super(message);
        this.status = status;
    }

    /** As Kotlin compiles `val status` (so the harness runs against the Kotlin class too). */
    public int getStatus() {
        return status;
    }
}
