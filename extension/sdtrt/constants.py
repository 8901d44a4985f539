"""The one place for every number that A1111 and Stable Diffusion fix for us."""

#: Tokens of prompt text per CLIP chunk, as A1111 counts them in the token counter.
TOKENS_PER_CHUNK = 75
#: Context rows per chunk: the 75 tokens plus BOS and EOS.
CHUNK_LEN = TOKENS_PER_CHUNK + 2
#: Pixels per latent cell: the VAE downsamples by 8 in each spatial dimension.
LATENT_FACTOR = 8
#: Width of the SDXL `y` (ADM) vector: pooled CLIP-G 1280 + 6 Fourier size embeddings of 256.
SDXL_BASE_Y_WIDTH = 2816
#: Width of the SDXL refiner `y` vector: pooled CLIP-G 1280 + 5 embeddings of 256 (with aesthetic score).
SDXL_REFINER_Y_WIDTH = 2560
#: Latent channels of SD1/SD2/SDXL; inpainting UNets take these plus mask (1) plus masked image (4).
LATENT_CHANNELS = 4
INPAINT_IN_CHANNELS = 9
#: Context (text embedding) widths of the families.
SD1_CONTEXT_DIM = 768
SD2_CONTEXT_DIM = 1024
SDXL_BASE_CONTEXT_DIM = 2048
SDXL_REFINER_CONTEXT_DIM = 1280
#: Batch rows per image with classifier-free guidance: cond and uncond in one UNet call.
CFG_ROWS = 2
#: Lowest ONNX opset we export: LayerNormalization (17) keeps LN in one node that TensorRT runs accurately.
MIN_OPSET = 17
DEFAULT_OPSET = 17
#: The checkpoint prefix A1111 (LDM/SGM) uses for UNet weights.
UNET_PREFIX = "model.diffusion_model."

#: The engines' input and output names belong to the model contracts (sdtrt.models).

#: Environment variable naming the engine cache folder (CLI default, WebUI default when its setting is empty).
CACHE_ENV = "SDTRT_CACHE"

#: Schema version of the on-disk manifests.
MANIFEST_SCHEMA = 1
