// JNI bridge of the Android demo: dev.edgemm.demo.EdgemmNative's `external fun`s over the C ABI
// (native/include/edgemm.h) and nothing else.
//
// Rules kept here:
//   - Handles cross as jlong (0 = none). A 0 handle, a bad array length, or a failed edgemm_* call throws a
//     Java exception and returns; nothing here aborts the process.
//   - Failed calls throw dev.edgemm.demo.EdgemmException(status, message) with edgemm_last_error()'s text
//     (read on the same thread, right after the call).
//   - Strings are converted between Java's UTF-16 and the engine's UTF-8 explicitly (JNI's "modified
//     UTF-8" differs for NUL and for characters outside the BMP, e.g. emoji); invalid UTF-8 -> U+FFFD.
//   - generate() calls the listener's onToken(piece, tokenId) on the calling thread for every token; the
//     listener returns false to stop (the engine then reports EDGEMM_ERR_CANCELLED, which is not an
//     error here: the stats say cancelled = 1). An exception thrown by the listener stops generation and
//     propagates to the caller.
//
// The same symbols are compiled and run on the host JDK by tests/test_android_bridge.py (a Java harness
// in android_demo/host_test declares the same native methods); that test also checks that the Kotlin
// declarations, the harness declarations and the symbols below are the same set with the same types.

#include <jni.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "edgemm.h"

namespace {

constexpr const char* kExceptionClass = "dev/edgemm/demo/EdgemmException";

// Indices of the DoubleArray generate() returns (EdgemmNative.kt's STAT_* constants name the same).
enum StatIndex {
  kImageEncodeMs = 0, kPrefillMs, kDecodeMs, kTtftMs, kVisualTokens, kPrefillTokens, kDecodeTokens,
  kNpuLaneBusy, kCpuLaneBusy, kCancelled, kStatCount
};

void throw_class(JNIEnv* env, const char* cls, const char* msg) {
  if (env->ExceptionCheck()) return;  // keep the first exception
  jclass c = env->FindClass(cls);
  if (c == nullptr) return;  // FindClass left a NoClassDefFoundError pending
  env->ThrowNew(c, msg);
  env->DeleteLocalRef(c);
}

std::u16string utf8_to_utf16(const char* s, size_t n) {
  std::u16string out;
  out.reserve(n);
  size_t i = 0;
  const auto* u = reinterpret_cast<const unsigned char*>(s);
  while (i < n) {
    uint32_t c = u[i];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    uint32_t cp = 0xFFFD;
    if (len == 1) {
      cp = c;
    } else if (len > 1 && i + len <= n) {
      cp = c & (0xFF >> (len + 1));
      bool ok = true;
      for (size_t k = 1; k < len; ++k) {
        if ((u[i + k] & 0xC0) != 0x80) { ok = false; break; }
        cp = (cp << 6) | (u[i + k] & 0x3F);
      }
      const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
      if (!ok || cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
        cp = 0xFFFD;
        len = 1;  // resynchronise on the next byte
      }
    } else {
      len = 1;
    }
    i += len;
    if (cp >= 0x10000) {
      cp -= 0x10000;
      out.push_back(static_cast<char16_t>(0xD800 + (cp >> 10)));
      out.push_back(static_cast<char16_t>(0xDC00 + (cp & 0x3FF)));
    } else {
      out.push_back(static_cast<char16_t>(cp));
    }
  }
  return out;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Java string -> UTF-8 (unpaired surrogates -> U+FFFD). Returns false (exception pending) on null/OOM.
bool to_utf8(JNIEnv* env, jstring js, const char* what, std::string* out) {
  if (js == nullptr) {
    std::string msg = std::string(what) + " is null";
    throw_class(env, "java/lang/NullPointerException", msg.c_str());
    return false;
  }
  const jsize n = env->GetStringLength(js);
  const jchar* chars = env->GetStringChars(js, nullptr);
  if (chars == nullptr) return false;  // OutOfMemoryError pending
  out->clear();
  out->reserve(static_cast<size_t>(n));
  for (jsize i = 0; i < n; ++i) {
    uint32_t c = chars[i];
    if (c >= 0xD800 && c <= 0xDBFF && i + 1 < n && chars[i + 1] >= 0xDC00 && chars[i + 1] <= 0xDFFF) {
      c = 0x10000 + ((c - 0xD800) << 10) + (chars[i + 1] - 0xDC00);
      ++i;
    } else if (c >= 0xD800 && c <= 0xDFFF) {
      c = 0xFFFD;
    }
    append_utf8(*out, c);
  }
  env->ReleaseStringChars(js, chars);
  return true;
}

jstring from_utf8(JNIEnv* env, const char* s, size_t n) {
  std::u16string w = utf8_to_utf16(s, n);
  return env->NewString(reinterpret_cast<const jchar*>(w.data()), static_cast<jsize>(w.size()));
}

// Throws EdgemmException(status, "<what>: <last error>") for a failed call.
void throw_status(JNIEnv* env, edgemm_status st, const char* what) {
  if (env->ExceptionCheck()) return;
  std::string msg = what;
  const char* last = edgemm_last_error();
  msg += ": ";
  msg += (last && *last) ? last : edgemm_status_name(st);
  jclass c = env->FindClass(kExceptionClass);
  if (c == nullptr) return;
  jmethodID ctor = env->GetMethodID(c, "<init>", "(ILjava/lang/String;)V");
  if (ctor == nullptr) { env->DeleteLocalRef(c); return; }
  jstring jmsg = from_utf8(env, msg.data(), msg.size());
  if (jmsg == nullptr) { env->DeleteLocalRef(c); return; }
  auto ex = static_cast<jthrowable>(env->NewObject(c, ctor, static_cast<jint>(st), jmsg));
  if (ex != nullptr) env->Throw(ex);
  env->DeleteLocalRef(jmsg);
  env->DeleteLocalRef(c);
}

template <typename T>
T* handle(JNIEnv* env, jlong h, const char* what) {
  if (h == 0) {
    std::string msg = std::string(what) + " handle is 0 (freed or never created)";
    throw_class(env, "java/lang/IllegalStateException", msg.c_str());
    return nullptr;
  }
  return reinterpret_cast<T*>(static_cast<intptr_t>(h));
}

struct Listener {
  JNIEnv* env;  // valid on the thread that called generate() only
  jobject obj;
  jmethodID on_token;
  std::thread::id owner = std::this_thread::get_id();
  bool java_exception = false;
  bool wrong_thread = false;
};

int32_t on_token(const char* piece, int32_t token_id, void* user) {
  auto* l = static_cast<Listener*>(user);
  if (std::this_thread::get_id() != l->owner) {  // the engine calls back on the caller's thread; never use
    l->wrong_thread = true;                       // a JNIEnv elsewhere: stop instead
    return 1;
  }
  JNIEnv* env = l->env;
  jstring js = from_utf8(env, piece ? piece : "", piece ? std::strlen(piece) : 0);
  if (js == nullptr) { l->java_exception = true; return 1; }
  jboolean go_on = env->CallBooleanMethod(l->obj, l->on_token, js, static_cast<jint>(token_id));
  env->DeleteLocalRef(js);
  if (env->ExceptionCheck()) { l->java_exception = true; return 1; }
  return go_on ? 0 : 1;
}

}  // namespace

extern "C" {

JNIEXPORT jint JNICALL Java_dev_edgemm_demo_EdgemmNative_abiVersion(JNIEnv* env, jclass) {
  return static_cast<jint>(edgemm_abi_version());
}

JNIEXPORT jstring JNICALL Java_dev_edgemm_demo_EdgemmNative_version(JNIEnv* env, jclass) {
  const char* v = edgemm_version();
  return from_utf8(env, v, std::strlen(v));
}

JNIEXPORT jlong JNICALL Java_dev_edgemm_demo_EdgemmNative_loadModel(JNIEnv* env, jclass, jstring path, jint nThreads,
                                                                   jboolean npuLane, jint chunkSize, jint maxContext) {
  std::string p;
  if (!to_utf8(env, path, "path", &p)) return 0;
  if (nThreads < 0 || chunkSize < 0 || maxContext < 0) {
    throw_class(env, "java/lang/IllegalArgumentException", "nThreads, chunkSize and maxContext must be >= 0 (0 = default)");
    return 0;
  }
  edgemm_load_options opts;
  edgemm_load_options_init(&opts);
  opts.n_threads = nThreads;
  opts.npu_lane = npuLane ? 1 : 0;
  opts.chunk_size = chunkSize;
  opts.max_context = maxContext;
  edgemm_model* model = nullptr;
  edgemm_status st = edgemm_model_load(p.c_str(), &opts, &model);
  if (st != EDGEMM_OK) {
    throw_status(env, st, "cannot load the model");
    return 0;
  }
  return static_cast<jlong>(reinterpret_cast<intptr_t>(model));
}

JNIEXPORT void JNICALL Java_dev_edgemm_demo_EdgemmNative_freeModel(JNIEnv* env, jclass, jlong model) {
  edgemm_model_free(reinterpret_cast<edgemm_model*>(static_cast<intptr_t>(model)));
}

JNIEXPORT jstring JNICALL Java_dev_edgemm_demo_EdgemmNative_modelInfo(JNIEnv* env, jclass, jlong model) {
  auto* m = handle<edgemm_model>(env, model, "model");
  if (m == nullptr) return nullptr;
  size_t needed = 0;
  std::vector<char> buf(4096);
  edgemm_status st = edgemm_model_info_json(m, buf.data(), buf.size(), &needed);
  if (st == EDGEMM_ERR_INVALID_ARGUMENT && needed > buf.size()) {
    buf.resize(needed);
    st = edgemm_model_info_json(m, buf.data(), buf.size(), &needed);
  }
  if (st != EDGEMM_OK) {
    throw_status(env, st, "model info");
    return nullptr;
  }
  return from_utf8(env, buf.data(), std::strlen(buf.data()));
}

JNIEXPORT jlong JNICALL Java_dev_edgemm_demo_EdgemmNative_createSession(JNIEnv* env, jclass, jlong model) {
  auto* m = handle<edgemm_model>(env, model, "model");
  if (m == nullptr) return 0;
  edgemm_session* s = nullptr;
  edgemm_status st = edgemm_session_create(m, &s);
  if (st != EDGEMM_OK) {
    throw_status(env, st, "cannot create a session");
    return 0;
  }
  return static_cast<jlong>(reinterpret_cast<intptr_t>(s));
}

JNIEXPORT void JNICALL Java_dev_edgemm_demo_EdgemmNative_freeSession(JNIEnv* env, jclass, jlong session) {
  edgemm_session_free(reinterpret_cast<edgemm_session*>(static_cast<intptr_t>(session)));
}

// argb: width*height pixels, row-major, 0xAARRGGBB (Android's Bitmap.getPixels, Java's BufferedImage.getRGB);
// alpha is ignored (the engine takes RGB).
JNIEXPORT void JNICALL Java_dev_edgemm_demo_EdgemmNative_setImageArgb(JNIEnv* env, jclass, jlong session,
                                                                     jintArray argb, jint width, jint height) {
  auto* s = handle<edgemm_session>(env, session, "session");
  if (s == nullptr) return;
  if (argb == nullptr) {
    throw_class(env, "java/lang/NullPointerException", "argb is null");
    return;
  }
  if (width <= 0 || height <= 0 || static_cast<int64_t>(width) * height > (int64_t{1} << 28)) {
    throw_class(env, "java/lang/IllegalArgumentException", "image width and height must be positive (and at most 2^28 pixels)");
    return;
  }
  const int64_t n = static_cast<int64_t>(width) * height;
  if (env->GetArrayLength(argb) < n) {
    throw_class(env, "java/lang/IllegalArgumentException", "argb has fewer than width * height pixels");
    return;
  }
  std::vector<uint8_t> rgb;
  try {
    rgb.resize(static_cast<size_t>(n) * 3);
  } catch (const std::bad_alloc&) {
    throw_class(env, "java/lang/OutOfMemoryError", "image buffer");
    return;
  }
  // Copy row by row so a huge photo never needs a second full int copy.
  std::vector<jint> row(static_cast<size_t>(width));
  for (jint y = 0; y < height; ++y) {
    env->GetIntArrayRegion(argb, static_cast<jsize>(static_cast<int64_t>(y) * width), width, row.data());
    if (env->ExceptionCheck()) return;
    uint8_t* dst = rgb.data() + static_cast<size_t>(y) * width * 3;
    for (jint x = 0; x < width; ++x) {
      const uint32_t p = static_cast<uint32_t>(row[static_cast<size_t>(x)]);
      dst[3 * x + 0] = static_cast<uint8_t>(p >> 16);
      dst[3 * x + 1] = static_cast<uint8_t>(p >> 8);
      dst[3 * x + 2] = static_cast<uint8_t>(p);
    }
  }
  edgemm_status st = edgemm_session_set_image_rgb8(s, rgb.data(), width, height, width * 3);
  if (st != EDGEMM_OK) throw_status(env, st, "cannot set the image");
}

JNIEXPORT void JNICALL Java_dev_edgemm_demo_EdgemmNative_clearImage(JNIEnv* env, jclass, jlong session) {
  auto* s = handle<edgemm_session>(env, session, "session");
  if (s == nullptr) return;
  edgemm_status st = edgemm_session_clear_image(s);
  if (st != EDGEMM_OK) throw_status(env, st, "cannot clear the image");
}

JNIEXPORT jdoubleArray JNICALL Java_dev_edgemm_demo_EdgemmNative_generate(JNIEnv* env, jclass, jlong session,
                                                                         jstring prompt, jint maxNewTokens,
                                                                         jfloat temperature, jint topK, jfloat topP,
                                                                         jlong seed, jobject listener) {
  auto* s = handle<edgemm_session>(env, session, "session");
  if (s == nullptr) return nullptr;
  std::string p;
  if (!to_utf8(env, prompt, "prompt", &p)) return nullptr;
  if (listener == nullptr) {
    throw_class(env, "java/lang/NullPointerException", "listener is null");
    return nullptr;
  }
  Listener l{env, listener, nullptr};
  jclass lc = env->GetObjectClass(listener);
  l.on_token = env->GetMethodID(lc, "onToken", "(Ljava/lang/String;I)Z");
  env->DeleteLocalRef(lc);
  if (l.on_token == nullptr) return nullptr;  // NoSuchMethodError pending

  edgemm_generate_options opts;
  edgemm_generate_options_init(&opts);
  opts.max_new_tokens = maxNewTokens;
  opts.temperature = temperature;
  opts.top_k = topK;
  opts.top_p = topP;
  opts.seed = static_cast<uint64_t>(seed);
  edgemm_stats stats;
  std::memset(&stats, 0, sizeof stats);
  stats.struct_size = sizeof stats;
  edgemm_status st = edgemm_generate(s, p.c_str(), &opts, on_token, &l, &stats);
  if (l.java_exception || env->ExceptionCheck()) return nullptr;  // the listener's exception propagates
  if (l.wrong_thread) {
    throw_class(env, "java/lang/IllegalStateException", "the engine called the token callback from another thread");
    return nullptr;
  }
  if (st != EDGEMM_OK && st != EDGEMM_ERR_CANCELLED) {
    throw_status(env, st, "generate");
    return nullptr;
  }
  double v[kStatCount];
  v[kImageEncodeMs] = stats.image_encode_ms;
  v[kPrefillMs] = stats.prefill_ms;
  v[kDecodeMs] = stats.decode_ms;
  v[kTtftMs] = stats.ttft_ms;
  v[kVisualTokens] = stats.visual_tokens;
  v[kPrefillTokens] = stats.prefill_tokens;
  v[kDecodeTokens] = stats.decode_tokens;
  v[kNpuLaneBusy] = stats.npu_lane_busy;
  v[kCpuLaneBusy] = stats.cpu_lane_busy;
  v[kCancelled] = st == EDGEMM_ERR_CANCELLED ? 1.0 : 0.0;
  jdoubleArray out = env->NewDoubleArray(kStatCount);
  if (out == nullptr) return nullptr;
  env->SetDoubleArrayRegion(out, 0, kStatCount, v);
  return out;
}

}  // extern "C"
