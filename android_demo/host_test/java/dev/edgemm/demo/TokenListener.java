package dev.edgemm.demo;

/** Host twin of the Kotlin `interface TokenListener` (EdgemmNative.kt). */
public interface TokenListener {
    boolean onToken(String piece, int tokenId);
}
